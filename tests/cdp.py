"""A small Chrome DevTools Protocol client: headless Chromium on loopback, driven over its WebSocket (trio-websocket).

Enough for the browser tests: open a tab, navigate, evaluate JavaScript, type text, emulate a phone-sized screen
and take PNG screenshots. One DevTools connection carries every tab ("flattened" sessions).

Contract: :func:`open_chromium` starts Chromium in its own process group with a throwaway profile and flags that
keep it off the internet (no background networking, sync, component updates or first-run fetches; every host name
but ``localhost`` resolves to nothing; any non-loopback connection goes to a dead proxy), and on exit kills the whole
group and checks that no process of it is left. Pages must use loopback URLs only.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio_websocket

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 20.0
MAX_MESSAGE_BYTES = 64 << 20  # screenshots arrive base64-encoded in one message

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
    # Belt and braces against reaching the internet: names other than localhost do not resolve, and whatever is
    # not loopback (which Chromium never proxies) is sent to a proxy on a port where nothing listens.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class CdpError(Exception):
    """A DevTools command failed, or JavaScript evaluated in the page threw."""


class Cdp:
    """One DevTools WebSocket: numbered commands and their answers, events routed to the tab they belong to."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._next_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.pages: dict[str, Page] = {}

    async def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> Any:
        """Send one command and return its ``result``; raises :class:`CdpError` for a protocol error."""
        self._next_id += 1
        ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[ident] = send
        try:
            await self._ws.send_message(json.dumps(message))
            with trio.fail_after(CALL_TIMEOUT_S):
                answer = await receive.receive()
        finally:
            self._waiting.pop(ident, None)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    async def run(self) -> None:
        """Read messages until the connection closes: answers to their callers, events to their tab."""
        while True:
            try:
                text = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            message = json.loads(text)
            if "id" in message:
                waiter = self._waiting.get(message["id"])
                if waiter is not None:
                    waiter.send_nowait(message)
            elif (page := self.pages.get(message.get("sessionId", ""))) is not None:
                page.on_event(message["method"], message.get("params", {}))


@dataclass(eq=False)
class Page:
    """One tab. ``errors`` collects uncaught exceptions and ``console.error`` lines of the page."""

    cdp: Cdp
    session: str
    errors: list[str] = field(default_factory=list)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.cdp.call(method, params, session=self.session)

    async def navigate(self, url: str, timeout_s: float = 15.0) -> None:
        """Load ``url`` and wait until its load event has fired."""
        assert url.startswith(("http://127.0.0.1:", "http://localhost:")), f"loopback URLs only: {url}"
        result = await self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        await self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", timeout_s)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited); raises :class:`CdpError` if it throws."""
        result = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(str(details.get("exception", {}).get("description") or details.get("text")))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy and return its value; fails with the last value after
        ``timeout_s``."""
        last: Any = None
        with trio.move_on_after(timeout_s):
            while True:
                last = await self.evaluate(expression)
                if last:
                    return last
                await trio.sleep(interval_s)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {expression} (last value {last!r})")

    async def insert_text(self, text: str) -> None:
        """Type ``text`` into the focused element as a user would (input events fire)."""
        await self.call("Input.insertText", {"text": text})

    async def set_viewport(self, width: int, height: int, *, mobile: bool = False, scale: float = 1.0) -> None:
        """Emulate a screen of ``width`` x ``height`` CSS pixels (``mobile`` honours the viewport meta tag)."""
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
        )

    async def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or the whole page) to ``path`` (folders created); returns ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = (await self.call("Page.getLayoutMetrics"))["cssContentSize"]
            params |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            }
        result = await self.call("Page.captureScreenshot", params)
        data = base64.b64decode(result["data"])
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        await trio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await trio.Path(path).write_bytes(data)
        return path


@dataclass(eq=False)
class Browser:
    """A running Chromium: open tabs with :meth:`new_page`."""

    cdp: Cdp
    pid: int

    async def new_page(self) -> Page:
        target = await self.cdp.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.cdp.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self.cdp, attached["sessionId"])
        self.cdp.pages[page.session] = page
        await page.call("Runtime.enable")
        await page.call("Page.enable")
        return page


def process_group_members(pgid: int) -> list[int]:
    """Pids of live processes in process group ``pgid`` (from ``/proc``; zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


async def _devtools_address(profile: Path, proc: trio.Process) -> tuple[int, str]:
    """Port and browser path from the ``DevToolsActivePort`` file Chromium writes once it listens."""
    port_file = profile / "DevToolsActivePort"
    with trio.fail_after(START_TIMEOUT_S):
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited with status {proc.returncode} before listening")
            lines = port_file.read_text().split("\n") if port_file.exists() else []
            if len(lines) >= 2 and lines[0].isdigit() and lines[1].startswith("/devtools/"):
                return int(lines[0]), lines[1]
            await trio.sleep(0.05)


@asynccontextmanager
async def open_chromium(binary: str, workdir: Path) -> AsyncIterator[Browser]:
    """Run headless Chromium (the executable ``binary``: tests take it from the ``chromium_path`` fixture of
    tests/tools.py) with a profile under ``workdir`` for the body of the ``async with``; see the module contract.
    Chromium's own log goes to ``workdir/chromium.log``."""
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a stale one from an earlier run would mislead us
    with (workdir / "chromium.log").open("wb") as log:
        proc = await trio.lowlevel.open_process(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: one killpg ends the zygote and renderers too
        )
    try:
        port, path = await _devtools_address(profile, proc)
        async with (
            trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}{path}", max_message_size=MAX_MESSAGE_BYTES) as ws,
            trio.open_nursery() as nursery,
        ):
            cdp = Cdp(ws)
            nursery.start_soon(cdp.run)
            yield Browser(cdp, proc.pid)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            while process_group_members(proc.pid):  # noqa: ASYNC110 - other processes; nothing to wait on
                await trio.sleep(0.05)
        assert proc.returncode is not None, "chromium did not exit"
        left = process_group_members(proc.pid)
        assert not left, f"chromium processes left behind: {left}"
