"""Registry of open simulator WebSockets, so faults and logout can reach (and close) every one of them."""

from __future__ import annotations

import itertools

import trio


class WsHandle:
    """One open WebSocket as the hub sees it: an id, a close request and a "fully closed" event."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.close_code: int | None = None
        self.close_reason = ""
        self.close_requested = trio.Event()
        self.closed = trio.Event()

    def request_close(self, code: int, reason: str = "") -> None:
        """Ask the connection's handler to close with ``code`` (first request wins)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.close_requested.set()


class WsHub:
    """The set of open WebSockets."""

    def __init__(self) -> None:
        self._open: dict[int, WsHandle] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, handle: WsHandle) -> None:
        """Register an accepted connection."""
        self._open[handle.id] = handle

    def remove(self, handle: WsHandle) -> None:
        """Unregister a connection (idempotent) and mark it closed."""
        self._open.pop(handle.id, None)
        handle.closed.set()

    async def close_all(self, code: int, reason: str = "", timeout_s: float = 2.0) -> int:
        """Ask every open connection to close with ``code``; wait (bounded) until their handlers ended.

        Returns how many connections were asked.
        """
        handles = list(self._open.values())
        for handle in handles:
            handle.request_close(code, reason)
        with trio.move_on_after(timeout_s):
            for handle in handles:
                await handle.closed.wait()
        return len(handles)
