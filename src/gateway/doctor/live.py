"""The doctor's walk along the live path to IBKR, one step at a time, stopping at the first failure.

Contract: :func:`walk` performs the same calls the gateway makes (the session's own call functions, the gateway's
TLS context, request signer and WebSocket client), each under the configured deadlines, and returns the
:class:`~gateway.doctor.report.Step` results of every step it ran. It never raises for an upstream or network
failure: each becomes a failed step whose hint comes from :mod:`gateway.hints` (or a step-specific one). It opens
its own IBKR session (a new live session token supersedes any other for the same access token) and logs it out at
the end, best effort. Details hold no secret: no token, cookie, signature or prepend is ever formatted.
"""

from __future__ import annotations

import contextlib
import json
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx
import trio

from gateway.config.model import Credentials
from gateway.doctor.report import Status, Step
from gateway.errors import GatewayError, OAuthError, UpstreamError, WebSocketRejected
from gateway.hints import Hint, hint_for
from gateway.oauth.basestring import QueryRule
from gateway.oauth.signer import RequestSigner
from gateway.redact import Secret
from gateway.session import calls
from gateway.session.paths import websocket_request
from gateway.upstream.client import build_client
from gateway.upstream.transport import Timeouts
from gateway.upstream.wsclient import WebSocketClosed, connect_websocket

__all__ = ["CLOCK_FAIL_S", "CLOCK_WARN_S", "LiveTarget", "walk"]

CLOCK_WARN_S = 3.0
"""Skew (seconds) that gets a warning; IBKR's ``Date`` has whole seconds, so smaller differences are noise."""
CLOCK_FAIL_S = 60.0
"""Skew (seconds) that fails the step: OAuth timestamps this far off are refused by servers that check them."""
TICKLE_SPACING_S = 1.1  # IBKR allows one tickle a second
CALL_SPACING_S = 0.25
AUTH_POLLS = 10
SNAPSHOT_TRIES = 4
PRICE_FIELDS = ("31", "84", "86")
WEBSOCKET_FIRST_MESSAGE_S = 15.0

_CLOCK_HINT_FIX = "synchronise this machine's clock (timedatectl set-ntp true, or chrony/ntpd)"
_DNS = Hint(
    cause="the host name of ibkr.base_url does not resolve (mistyped, or no DNS on this machine)",
    fix="check the host in ibkr.base_url (IBKR's is api.ibkr.com) and this machine's DNS resolver",
    keys=("ibkr.base_url",),
)
_WS_REFUSED = Hint(
    cause="IBKR refused the WebSocket upgrade: it did not accept the session cookie from tickle with this access token",
    fix="check ibkr.access_token; if the REST steps passed, retry - IBKR's WebSocket service may be restarting",
    keys=("ibkr.access_token",),
)
_NO_BROKERAGE = Hint(
    cause=(
        "IBKR did not open the brokerage session: it is in its nightly reset window, or the user's Web API access "
        "lacks trading or market-data permissions"
    ),
    fix="retry in a few minutes; if it persists, check the user's API permissions in IBKR's portal",
)
_NO_RULE = Hint(
    cause="IBKR refused a signed request with a query string under every signing rule",
    fix="check the failing answer above; if it is 401, report it with the doctor's JSON output",
    keys=("ibkr.query_rule",),
)
_NO_PRICES = Hint(
    cause="no price fields for this contract: no market-data subscription for it, or the market is closed",
    fix="subscribe to the market data in IBKR's portal, or run the doctor with --conid for a contract you can see",
)


@dataclass(frozen=True, slots=True)
class LiveTarget:
    """Where and as whom to walk: ``base_url`` without the ``/v1/api`` part, as in ``ibkr.base_url``."""

    base_url: str
    credentials: Credentials
    user_agent: str
    compete: bool
    timeouts: Timeouts
    tls: ssl.SSLContext
    conid: int = 265598


def _fail(name: str, detail: str, hint: Hint | None = None) -> Step:
    return Step(name, Status.FAIL, detail, hint if hint is not None else hint_for(detail))


class _Walk:
    """The state one walk carries from step to step (the token, the signer, the cookie)."""

    def __init__(self, target: LiveTarget, client: httpx.AsyncClient) -> None:
        self.target = target
        self.client = client
        parts = urlsplit(target.base_url)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        self.where = f"{self.host}:{self.port}"
        self.lst: calls.LiveSessionToken | None = None
        self.lst_error: GatewayError | None = None
        self.signer: RequestSigner | None = None
        self.cookie: Secret[str] | None = None
        self.last_tickle = -math.inf

    async def dns(self) -> Step:
        try:
            infos = await trio.socket.getaddrinfo(self.host, self.port, type=trio.socket.SOCK_STREAM)
        except OSError as exc:
            return _fail("dns", f"cannot resolve {self.host} ({exc.strerror or exc})", _DNS)
        addresses = sorted({str(info[4][0]) for info in infos})
        return Step("dns", Status.OK, f"{self.host} → {', '.join(addresses[:4])}")

    async def tcp(self) -> Step:
        try:
            with trio.fail_after(self.target.timeouts.connect_s):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
            return _fail("tcp", f"cannot connect to {self.where} ({reason})", hint_for("cannot connect"))
        await stream.aclose()
        return Step("tcp", Status.OK, f"connected to {self.where}")

    async def tls(self) -> Step:
        if not self.secure:
            return Step("tls", Status.SKIPPED, "ibkr.base_url is plain http (the simulator, or a TLS-ending proxy)")
        try:
            with trio.fail_after(self.target.timeouts.connect_s):
                stream = await trio.open_tcp_stream(self.host, self.port)
                async with trio.SSLStream(
                    stream, self.target.tls, server_hostname=self.host, https_compatible=True
                ) as tls:
                    await tls.do_handshake()
                    version = tls.version() or "TLS"
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or str(cause)
            return _fail("tls", f"TLS handshake with {self.where} failed ({reason or type(cause).__name__})", None)
        return Step("tls", Status.OK, f"{version}, certificate for {self.host} verified")

    async def clock(self) -> Step:
        try:
            response = await self.client.get(self.target.base_url + "/", headers={"User-Agent": self.target.user_agent})
        except httpx.HTTPError as exc:
            return _fail("clock", f"GET / on {self.where} failed ({type(exc).__name__}: {exc})")
        local = time.time()
        date = response.headers.get("date")
        if date is None:
            return Step("clock", Status.SKIPPED, "IBKR's answer carried no Date header to compare with")
        try:
            remote = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return Step("clock", Status.SKIPPED, f"IBKR's Date header is not a date: {date[:40]!r}")
        skew = local - (remote + 0.5)  # a Date has whole seconds: IBKR's clock was somewhere in that second
        text = f"this machine's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} IBKR's"
        if abs(skew) >= CLOCK_FAIL_S:
            return _fail("clock", text, Hint(f"{text}; OAuth requests carry a timestamp IBKR checks", _CLOCK_HINT_FIX))
        if abs(skew) >= CLOCK_WARN_S:
            return Step("clock", Status.WARN, text, Hint(text, _CLOCK_HINT_FIX))
        return Step("clock", Status.OK, f"within {CLOCK_WARN_S:g} s of IBKR's Date header")

    async def live_session_token(self) -> Step:
        target = self.target
        try:
            self.lst = await calls.request_live_session_token(
                self.client, base_url=target.base_url, credentials=target.credentials, user_agent=target.user_agent
            )
        except OAuthError as exc:  # IBKR answered; the token did not validate
            self.lst_error = exc
            return Step("live_session_token", Status.OK, "IBKR answered with a Diffie-Hellman response")
        except GatewayError as exc:
            return _fail("live_session_token", str(exc))
        return Step("live_session_token", Status.OK, "IBKR answered with a Diffie-Hellman response")

    async def lst_validation(self) -> Step:
        if self.lst is None:
            return _fail("lst_validation", str(self.lst_error or "no live session token"))
        self.signer = calls.request_signer(
            self.target.credentials.identity, self.lst.token, self.target.credentials.query_rule
        )
        expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.lst.expires_at_ms / 1000))
        return Step("lst_validation", Status.OK, f"matches IBKR's signature; valid until {expires}")

    @property
    def _signer(self) -> RequestSigner:
        assert self.signer is not None  # set by lst_validation, which every later step follows
        return self.signer

    async def brokerage_session(self) -> Step:
        try:
            status = await calls.ssodh_init(
                self.client,
                base_url=self.target.base_url,
                signer=self._signer,
                user_agent=self.target.user_agent,
                compete=self.target.compete,
            )
        except GatewayError as exc:
            return _fail("brokerage_session", str(exc))
        state = "authenticated" if status.authenticated else "opening"
        return Step("brokerage_session", Status.OK, f"ssodh/init answered ({state}, compete={self.target.compete})")

    async def _tickle(self) -> calls.TickleResult:
        await trio.sleep_until(self.last_tickle + TICKLE_SPACING_S)
        try:
            return await calls.tickle(
                self.client, base_url=self.target.base_url, signer=self._signer, user_agent=self.target.user_agent
            )
        finally:
            self.last_tickle = trio.current_time()

    async def tickle(self) -> Step:
        for _ in range(AUTH_POLLS):
            try:
                result = await self._tickle()
            except GatewayError as exc:
                return _fail("tickle", str(exc))
            self.cookie = result.session
            if result.status.competing:
                return _fail(
                    "tickle",
                    "another session of this IBKR user holds the brokerage session (competing)",
                    hint_for("competing"),
                )
            if result.status.authenticated:
                return Step("tickle", Status.OK, "session cookie received; brokerage session authenticated")
        message = f" ({result.status.message})" if result.status.message else ""
        return _fail(
            "tickle", f"brokerage session not authenticated after {AUTH_POLLS} tickles{message}", _NO_BROKERAGE
        )

    async def accounts(self) -> Step:
        try:
            accounts = await calls.iserver_accounts(
                self.client, base_url=self.target.base_url, signer=self._signer, user_agent=self.target.user_agent
            )
        except GatewayError as exc:
            return _fail("accounts", str(exc))
        if not accounts.iserver:
            return _fail("accounts", "IBKR lists no brokerage account for this user", _NO_BROKERAGE)
        selected = f", selected {accounts.selected}" if accounts.selected else ""
        return Step("accounts", Status.OK, f"{', '.join(accounts.iserver)}{selected}")

    async def websocket(self) -> Step:
        assert self.cookie is not None
        target = self.target
        url, headers = websocket_request(
            "ws" + target.base_url.removeprefix("http"),
            access_token=target.credentials.identity.access_token,
            cookie=self.cookie.reveal(),
            user_agent=target.user_agent,
        )
        try:
            async with connect_websocket(
                url, extra_headers=headers, ssl_context=target.tls, connect_timeout_s=target.timeouts.connect_s
            ) as ws:
                with trio.fail_after(WEBSOCKET_FIRST_MESSAGE_S):
                    first = await ws.receive()
                await ws.start_close(1000, "doctor done")
        except WebSocketRejected as exc:
            return _fail(
                "websocket", f"IBKR refused the WebSocket upgrade with HTTP {exc.upstream_status}", _WS_REFUSED
            )
        except WebSocketClosed as exc:
            return _fail("websocket", f"IBKR closed the WebSocket before its first message ({exc.code})", _WS_REFUSED)
        except trio.TooSlowError:
            return _fail(
                "websocket", f"no message from IBKR within {WEBSOCKET_FIRST_MESSAGE_S:g} s of opening", _WS_REFUSED
            )
        except UpstreamError as exc:
            return _fail("websocket", f"cannot open the WebSocket to {self.where}: {exc}")
        return Step("websocket", Status.OK, f"opened; IBKR's first message: {_topic(first)}")

    def _snapshot_url(self) -> str:
        return (
            f"{self.target.base_url}/v1/api/iserver/marketdata/snapshot?conids={self.target.conid}&fields=31%2C84%2C86"
        )

    async def _signed_get(self, url: str, signer: RequestSigner) -> httpx.Response | str:
        headers = {"Authorization": signer.authorization("GET", url), "User-Agent": self.target.user_agent}
        try:
            return await self.client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"

    async def query_rule(self) -> Step:
        assert self.lst is not None
        identity, configured = self.target.credentials.identity, self.target.credentials.query_rule
        verdicts: dict[QueryRule, str] = {}
        for rule in QueryRule:
            await trio.sleep(CALL_SPACING_S)
            answer = await self._signed_get(self._snapshot_url(), calls.request_signer(identity, self.lst.token, rule))
            verdicts[rule] = answer if isinstance(answer, str) else str(answer.status_code)
        accepted = [rule for rule, verdict in verdicts.items() if verdict == "200"]
        seen = ", ".join(f"{rule.value}: {verdict}" for rule, verdict in verdicts.items())
        if configured in accepted:
            return Step("query_rule", Status.OK, f'ibkr.query_rule = "{configured.value}" works (answers: {seen})')
        if not accepted:
            return _fail("query_rule", f"no rule was accepted (answers: {seen})", _NO_RULE)
        best = QueryRule.INCLUDE if QueryRule.INCLUDE in accepted else accepted[0]
        hint = Hint(
            cause=f'IBKR refuses query strings signed with the configured rule "{configured.value}"',
            fix=f'set ibkr.query_rule = "{best.value}"',
            keys=("ibkr.query_rule",),
        )
        return _fail("query_rule", f'set ibkr.query_rule = "{best.value}" (answers: {seen})', hint)

    async def snapshot(self) -> Step:
        assert self.signer is not None
        answers: list[str] = []
        for attempt in range(SNAPSHOT_TRIES):
            await trio.sleep(1.0 if attempt else CALL_SPACING_S)
            answer = await self._signed_get(self._snapshot_url(), self.signer)
            if isinstance(answer, str):
                return _fail("snapshot", f"snapshot request failed ({answer})")
            if answer.status_code != 200:
                text = answer.text[:200].replace("\n", " ")
                return _fail(
                    "snapshot", f"GET /iserver/marketdata/snapshot: IBKR answered {answer.status_code}: {text}"
                )
            prices = _prices(answer)
            answers.append("pre-flight" if not prices else "prices")
            if prices:
                shown = ", ".join(f"{name} {value}" for name, value in prices.items())
                return Step("snapshot", Status.OK, f"conid {self.target.conid}: {shown} (after {attempt} pre-flight)")
        return Step(
            "snapshot", Status.WARN, f"conid {self.target.conid}: no prices in {SNAPSHOT_TRIES} snapshots", _NO_PRICES
        )

    async def logout(self) -> None:
        if self.signer is None:
            return
        with trio.move_on_after(self.target.timeouts.connect_s), contextlib.suppress(GatewayError):
            await calls.logout(
                self.client, base_url=self.target.base_url, signer=self._signer, user_agent=self.target.user_agent
            )


_NAMES = {"31": "last", "84": "bid", "86": "ask"}


def _prices(response: httpx.Response) -> dict[str, str]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    row = body[0] if isinstance(body, list) and body and isinstance(body[0], dict) else {}
    return {_NAMES[f]: str(row[f])[:20] for f in PRICE_FIELDS if row.get(f) not in (None, "")}


def _topic(message: str | bytes) -> str:
    """What IBKR's first WebSocket message says: its topic and, for ``system``, the user and paper or live."""
    try:
        decoded = json.loads(message)
    except ValueError:
        return "not JSON"
    if not isinstance(decoded, dict) or decoded.get("topic") is None:
        return "no topic"
    text = f"topic {str(decoded['topic'])[:20]!r}"
    user, paper = decoded.get("success"), decoded.get("isPaper")
    if decoded["topic"] == "system" and isinstance(user, str) and user:
        kind = {True: ", paper", False: ", live"}.get(paper, "") if isinstance(paper, bool) else ""
        text += f" (user {user[:40]!r}{kind})"
    return text


async def walk(target: LiveTarget) -> list[Step]:
    """Run the live steps in order until one fails; returns the steps that ran (see the module contract)."""
    async with build_client(target.timeouts, tls=target.tls, max_connections=4) as client:
        state = _Walk(target, client)
        order: tuple[Callable[[], Awaitable[Step]], ...] = (
            state.dns,
            state.tcp,
            state.tls,
            state.clock,
            state.live_session_token,
            state.lst_validation,
            state.brokerage_session,
            state.tickle,
            state.accounts,
            state.websocket,
            state.query_rule,
            state.snapshot,
        )
        steps: list[Step] = []
        try:
            for run in order:
                try:
                    step = await run()
                except Exception as exc:  # a bug or an answer nobody foresaw: a failed step, never a traceback
                    step = _fail(run.__name__, f"unexpected {type(exc).__name__} (please report it)")
                steps.append(step)
                if step.status is Status.FAIL:
                    break
        finally:
            await state.logout()
        return steps
