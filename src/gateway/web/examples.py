"""Serves the dashboard example shipped in the package at ``/examples/dashboard/``: fixed files, no file-system walk.

Contract: the files of the package folder ``gateway/web/examples/dashboard`` whose type is known (HTML, JavaScript,
CSS) are read once, when the app is built; each is served by its exact name below ``/examples/dashboard/``, and
``index.html`` also at ``/examples/dashboard/`` itself. ``/examples/dashboard`` redirects there (relative asset URLs
need the slash). Any other path below the prefix is 404 and a method other than GET/HEAD is 405, so no request can
name a file outside that set. Every file goes out with its content type, ``Cache-Control: no-cache``,
``X-Content-Type-Options: nosniff`` and a Content-Security-Policy that lets the page load and connect to its own
origin only, and never be framed. The files hold no data and no secret, so they are served without an API key;
every call the page makes to the gateway needs one when keys are configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.asgi import Receive, Scope, Send, send_error

PREFIX = "/examples/dashboard"
DASHBOARD_DIR = Path(__file__).with_name("examples") / "dashboard"
CONTENT_TYPES: Mapping[str, bytes] = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
}
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: bytes


def is_example_path(path: str) -> bool:
    """Whether ``path`` (already canonical) belongs to the example: the prefix itself or anything below it."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def load_files(folder: Path = DASHBOARD_DIR) -> dict[str, _File]:
    """URL path -> file, for every file of a known type directly in ``folder``; fails if ``index.html`` is missing
    (a broken install, better told at start than as a 404 later)."""
    files: dict[str, _File] = {}
    for entry in sorted(folder.iterdir()):
        content_type = CONTENT_TYPES.get(entry.suffix)
        if entry.is_file() and content_type is not None:
            files[f"{PREFIX}/{entry.name}"] = _File(entry.read_bytes(), content_type)
    index = files.get(f"{PREFIX}/index.html")
    if index is None:
        raise FileNotFoundError(f"the dashboard example is missing from the installed package ({folder})")
    files[f"{PREFIX}/"] = index
    return files


class ExamplesApp:
    """The ASGI app for paths where :func:`is_example_path` is true (HTTP only); see the module contract."""

    def __init__(self, files: Mapping[str, _File] | None = None) -> None:
        self._files = dict(files) if files is not None else load_files()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if method not in ("GET", "HEAD"):
            await send_error(
                send,
                405,
                "method_not_allowed",
                f"{method} is not allowed on {path}",
                headers=[(b"allow", b"GET, HEAD")],
            )
            return
        if path == PREFIX:
            await self._send(send, 308, b"", None, [(b"location", f"{PREFIX}/".encode())], head=False)
            return
        file = self._files.get(path)
        if file is None:
            await send_error(send, 404, "not_found", f"{path} is not a file of the dashboard example")
            return
        await self._send(send, 200, file.body, file.content_type, [], head=method == "HEAD")

    @staticmethod
    async def _send(
        send: Send,
        status: int,
        body: bytes,
        content_type: bytes | None,
        extra: list[tuple[bytes, bytes]],
        *,
        head: bool,
    ) -> None:
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-cache"),
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", _CSP),
            (b"referrer-policy", b"no-referrer"),
            *extra,
        ]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})
