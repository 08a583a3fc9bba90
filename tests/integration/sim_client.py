"""A small, independent IBKR OAuth 1.0a client for the simulator's tests, written only from docs/protocol.md.

It must not import ``gateway.oauth`` nor the simulator's verification code: it is the second, independent
implementation the simulator is checked against (and it is itself checked against the vectors in
``test_sim_client.py``). It deliberately exposes knobs to produce each deviation the simulator must reject.
"""

from __future__ import annotations

import base64
import functools
import gc
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio
import trio_websocket
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.simulator import Simulator, SimulatorCredentials, generate_credentials

QueryMode = Literal["include", "omit", "in_url"]
KEncoding = Literal["java", "minimal"]
UA = "sim-test-client/1.0"


@functools.cache
def shared_credentials() -> SimulatorCredentials:
    """One throwaway credential set per test process (RSA-2048 keygen is the slow part)."""
    return generate_credentials()


def pct(text: str) -> str:
    """RFC 3986 percent-encoding (docs/protocol.md §4.2): unreserved stay, everything else %XX."""
    return urllib.parse.quote(text, safe="~")


def k_bytes(k: int, encoding: KEncoding = "java") -> bytes:
    """K as bytes: Java ``BigInteger.toByteArray`` (correct) or minimal unsigned (the §9.2 bug)."""
    if encoding == "java":
        return k.to_bytes(k.bit_length() // 8 + 1, "big")
    return k.to_bytes(max(1, (k.bit_length() + 7) // 8), "big")


def read_dh_pem(pem: bytes) -> tuple[int, int]:
    """(p, g) from a PKCS#3 PEM: SEQUENCE { INTEGER p, INTEGER g } (§1)."""
    lines = [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]
    der = base64.b64decode("".join(lines))

    def tlv(pos: int) -> tuple[int, bytes, int]:
        tag, length = der[pos], der[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(der[pos : pos + n], "big")
            pos += n
        return tag, der[pos : pos + length], pos + length

    tag, _, _ = tlv(0)
    assert tag == 0x30
    header_len = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    _, p_bytes, nxt = tlv(header_len)
    _, g_bytes, _ = tlv(nxt)
    return int.from_bytes(p_bytes, "big"), int.from_bytes(g_bytes, "big")


def base_string(method: str, url: str, params: list[tuple[str, str]], prepend: str = "") -> str:
    """``[prepend]METHOD&pct(url)&pct(sorted k=v joined by &)`` (§3.2)."""
    joined = "&".join(f"{k}={v}" for k, v in sorted(params))
    return f"{prepend}{method}&{pct(url)}&{pct(joined)}"


def auth_header(params: list[tuple[str, str]], signature_b64: str, realm: str, layout: str = "ibind") -> str:
    """``OAuth ...`` header in one of the layouts of §3.3: ``ibind`` (realm first, sorted, ", "),
    ``ibpy`` (all sorted incl. realm, so realm last), ``ibcs`` (insertion order, "," without space)."""
    items = [*params, ("oauth_signature", pct(signature_b64))]
    if layout == "ibind":
        pairs = [("realm", realm), *sorted(items)]
        sep = ", "
    elif layout == "ibpy":
        pairs = sorted([*items, ("realm", realm)])
        sep = ", "
    else:
        pairs = [*items, ("realm", realm)]
        sep = ","
    return "OAuth " + sep.join(f'{k}="{v}"' for k, v in pairs)


@dataclass
class LstResult:
    """Outcome of one LST handshake as the client sees it."""

    status: int
    body: dict[str, Any]
    lst: bytes | None = None
    valid: bool = False
    k_top_bit_set: bool = False


@dataclass
class Client:
    """The independent client. Knobs produce deviations: ``query_mode``, ``k_encoding``, ``realm``,
    ``prepend_override``, ``user_agent`` (None = no header), ``signature_method``."""

    creds: SimulatorCredentials
    base_url: str
    query_mode: QueryMode = "include"
    k_encoding: KEncoding = "java"
    realm: str | None = None
    prepend_override: str | None = None
    user_agent: str | None = UA
    layout: str = "ibind"
    lst: bytes | None = None
    last_nonce: str = ""
    _sig_key: rsa.RSAPrivateKey = field(init=False)
    _prepend: str = field(init=False)

    def __post_init__(self) -> None:
        sig = serialization.load_pem_private_key(self.creds.signature_key_pem, password=None)
        enc = serialization.load_pem_private_key(self.creds.encryption_key_pem, password=None)
        assert isinstance(sig, rsa.RSAPrivateKey)
        assert isinstance(enc, rsa.RSAPrivateKey)
        self._sig_key = sig
        self._prepend = enc.decrypt(base64.b64decode(self.creds.access_token_secret), padding.PKCS1v15()).hex()

    @property
    def prepend(self) -> str:
        return self.prepend_override if self.prepend_override is not None else self._prepend

    def _oauth_params(self, method: str, nonce: str | None, timestamp: str | None) -> list[tuple[str, str]]:
        self.last_nonce = nonce or secrets.token_hex(16)
        return [
            ("oauth_consumer_key", self.creds.consumer_key),
            ("oauth_nonce", self.last_nonce),
            ("oauth_signature_method", method),
            ("oauth_timestamp", timestamp or str(int(time.time()))),
            ("oauth_token", self.creds.access_token),
        ]

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.user_agent is not None:
            headers["User-Agent"] = self.user_agent
        return headers

    async def get_lst(
        self,
        http: httpx.AsyncClient,
        *,
        nonce: str | None = None,
        timestamp: str | None = None,
        challenge_hex: str | None = None,
    ) -> LstResult:
        """``POST /oauth/live_session_token`` (§4), then derive and validate the LST locally."""
        p, g = read_dh_pem(self.creds.dh_param_pem)
        a = secrets.randbits(256)
        challenge = challenge_hex if challenge_hex is not None else format(pow(g, a, p), "x")
        url = f"{self.base_url}/v1/api/oauth/live_session_token"
        params = [*self._oauth_params("RSA-SHA256", nonce, timestamp), ("diffie_hellman_challenge", challenge)]
        base = base_string("POST", url, params, self.prepend)
        signature = self._sig_key.sign(base.encode(), padding.PKCS1v15(), hashes.SHA256())
        header = auth_header(params, base64.b64encode(signature).decode(), self.realm or self.creds.realm, self.layout)
        response = await http.post(url, headers=self._headers({"Authorization": header}))
        body = response.json()
        result = LstResult(status=response.status_code, body=body)
        if response.status_code != 200:
            return result
        k = pow(int(body["diffie_hellman_response"], 16), a, p)
        lst = hmac.new(k_bytes(k, self.k_encoding), bytes.fromhex(self._prepend), hashlib.sha1).digest()
        expected = hmac.new(lst, self.creds.consumer_key.encode(), hashlib.sha1).hexdigest()
        result.lst = lst
        result.valid = hmac.compare_digest(expected, body["live_session_token_signature"])
        result.k_top_bit_set = k.bit_length() % 8 == 0
        self.lst = lst
        return result

    def sign(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        *,
        nonce: str | None = None,
        timestamp: str | None = None,
        raw_query: str | None = None,
    ) -> tuple[str, dict[str, str]]:
        """Return ``(url, headers)`` for an HMAC-SHA256-signed request (§5) under the current LST."""
        assert self.lst is not None, "get an LST first"
        query = query or []
        if raw_query is None:
            raw_query = "&".join(f"{pct(k)}={pct(v)}" for k, v in query)
        url = f"{self.base_url}{path}"
        full = f"{url}?{raw_query}" if raw_query else url
        params = self._oauth_params("HMAC-SHA256", nonce, timestamp)
        if self.query_mode == "include":
            signed = base_string(method, url, [*params, *query])
        elif self.query_mode == "omit":
            signed = base_string(method, url, params)
        else:
            signed = base_string(method, full, params)
        mac = hmac.new(self.lst, signed.encode(), hashlib.sha256).digest()
        header = auth_header(params, base64.b64encode(mac).decode(), self.realm or self.creds.realm, self.layout)
        return full, self._headers({"Authorization": header})

    async def request(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        nonce: str | None = None,
        timestamp: str | None = None,
    ) -> httpx.Response:
        """Send one signed request."""
        url, signed_headers = self.sign(method, path, query, nonce=nonce, timestamp=timestamp)
        signed_headers.update(headers or {})
        return await http.request(method, url, headers=signed_headers, json=json, content=content)


RULES_OFF = {"accounts_first": False, "snapshot_preflight": False, "pacing": False}
"""IBKR's runtime rules, off: the direct protocol tests send requests back to back to probe signature checks and
faults, which IBKR's pacing would answer 429; the rules' own tests (and every gateway test) switch them on."""


async def start_simulator(nursery: trio.Nursery, **options: Any) -> tuple[Simulator, str]:
    """Start a simulator on a free loopback port with test-friendly timings and IBKR's runtime rules off unless
    ``options`` switch them on (see :data:`RULES_OFF`); returns it and its URL."""
    settings: dict[str, Any] = {"heartbeat_s": 0.2, "tick_interval_s": 0.05, **RULES_OFF, **options}
    sim = Simulator(shared_credentials(), **settings)
    url = await nursery.start(sim.serve, "127.0.0.1", 0)
    return sim, url


async def ready_client(http: httpx.AsyncClient, url: str, *, init: bool = True, **knobs: Any) -> Client:
    """A client with a validated LST and (optionally) an open brokerage session."""
    client = Client(shared_credentials(), url, **knobs)
    result = await client.get_lst(http)
    assert result.status == 200, result.body
    assert result.valid
    if init:
        r = await client.request(
            http, "POST", "/v1/api/iserver/auth/ssodh/init", json={"publish": True, "compete": True}
        )
        assert r.status_code == 200, r.text
    return client


def ws_url(url: str, token: str | None) -> str:
    """The simulator's WebSocket URL with ``oauth_token`` (omitted when None)."""
    base = url.replace("http://", "ws://", 1) + "/v1/api/ws"
    return base if token is None else f"{base}?oauth_token={token}"


def ws_headers(session: str | None, *, user_agent: bool = True) -> list[tuple[bytes, bytes]]:
    """Handshake headers: ``Cookie: api=<session>`` and a User-Agent."""
    headers: list[tuple[bytes, bytes]] = []
    if session is not None:
        headers.append((b"Cookie", f"api={session}".encode()))
    if user_agent:
        headers.append((b"User-Agent", UA.encode()))
    return headers


async def next_json(ws: trio_websocket.WebSocketConnection, topic_prefix: str | None = None) -> Any:
    """The next JSON message (text or binary frame), optionally skipping until ``topic`` starts with a prefix."""
    while True:
        raw = await ws.get_message()
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text == "ech+hb":
            if topic_prefix == "ech+hb":
                return text
            continue
        message = json.loads(text)
        if topic_prefix is None or str(message.get("topic", "")).startswith(topic_prefix):
            return message


async def wait_closed(ws: trio_websocket.WebSocketConnection) -> trio_websocket.CloseReason:
    """Read until the server closes; return its close reason.

    trio-websocket 0.12.2 does not close its own TCP socket when the *server* closes first (its reader stops on
    EOF without ``aclose``), which leaks a socket and a ResourceWarning; close the stream here explicitly.
    """
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed as closed:
        reason = closed.reason
    await ws._stream.aclose()
    assert reason is not None
    return reason


async def ws_rejected(url: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes | None]:
    """Open a WebSocket that the server must refuse; return ``(status, body)`` of the refusal.

    trio-websocket 0.12.2 leaves its TCP socket open after ``ConnectionRejected``; the socket is reclaimed here
    (with its ResourceWarning silenced) so the leak stays in this helper instead of failing a later test.
    """
    outcome: tuple[int, bytes | None] | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            async with trio_websocket.open_websocket_url(url, extra_headers=headers):
                pass
        except trio_websocket.ConnectionRejected as rejected:
            outcome = (rejected.status_code, rejected.body)
        gc.collect()
    assert outcome is not None, "the handshake was accepted"
    return outcome
