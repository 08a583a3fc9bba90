"""Render the two nginx configs: upstream "A" (serves the benchmark data, fronts the simulator) and proxy "B"."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SMALL_BODY = '{"ok":true}'


@dataclass(frozen=True, slots=True)
class UpstreamPorts:
    """Where nginx A listens and what it proxies to (all on 127.0.0.1)."""

    listen: int
    simulator: int
    wsecho: int
    sink: int
    ticker_listen: int  # a second server: /v1/api/ws → bench/ticker.py (the fan-out measurement), / → simulator
    ticker: int


def _preamble(workdir: Path, name: str, nofile: int) -> str:
    """Main context shared by both instances: one worker, foreground, every path inside ``workdir``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers read files in a 0700 temp dir
    return f"""\
daemon off;
master_process on;
worker_processes 1;
{user}pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {max(1024, nofile // 2)};
    multi_accept on;
}}
"""


def _http_common(workdir: Path, name: str) -> str:
    temp = workdir / f"{name}_temp"
    return f"""\
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    server_tokens off;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
"""


_WS_PROXY = """\
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
"""

_TO_SIMULATOR = """\
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;  # the simulator checks signatures against the Host it was sent to
            proxy_pass http://simulator;
        }
"""


def render_upstream(workdir: Path, ports: UpstreamPorts, big_file: Path, nofile: int) -> str:
    """nginx A: the fast upstream (small JSON, 1 GiB file by sendfile, upload sink, WS echo, simulator), and on a
    second port the IBKR-like ticker's WebSocket with the simulator behind everything else."""
    return (
        _preamble(workdir, "a", nofile)
        + "http {\n"
        + _http_common(workdir, "a")
        + f"""\
    sendfile on;
    tcp_nopush on;
    upstream simulator {{
        server 127.0.0.1:{ports.simulator};
        keepalive 8;
    }}
    upstream sink {{
        server 127.0.0.1:{ports.sink};
        keepalive 8;
    }}
    upstream wsecho {{
        server 127.0.0.1:{ports.wsecho};
    }}
    upstream ticker {{
        server 127.0.0.1:{ports.ticker};
    }}
    server {{
        listen 127.0.0.1:{ports.listen} backlog=4096;
        location = /v1/api/bench/small {{
            default_type application/json;
            return 200 '{SMALL_BODY}';
        }}
        location = /v1/api/bench/big {{
            default_type application/octet-stream;
            alias {big_file};
        }}
        location = /v1/api/bench/upload {{
            client_max_body_size 0;
            client_body_buffer_size 1m;  # keep the upstream fast (nginx's 16k default streams ~3x slower)
            proxy_request_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://sink;
        }}
        location /v1/api/ws {{
{_WS_PROXY}            proxy_pass http://wsecho;
        }}
{_TO_SIMULATOR}    }}
    server {{
        listen 127.0.0.1:{ports.ticker_listen} backlog=4096;
        location /v1/api/ws {{
{_WS_PROXY}            proxy_pass http://ticker;
        }}
{_TO_SIMULATOR}    }}
}}
"""
    )


def render_proxy(workdir: Path, listen: int, upstream: int, nofile: int) -> str:
    """nginx B: a plain reverse proxy to nginx A (keep-alive upstream, HTTP/1.1, WebSocket upgrades).

    Request bodies stream (``proxy_request_buffering off``) and responses never spill to temp files
    (``proxy_max_temp_file_size 0``), so a 1 GiB transfer measures proxying, not the disk.
    """
    return (
        _preamble(workdir, "b", nofile)
        + "http {\n"
        + _http_common(workdir, "b")
        + f"""\
    upstream a {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{listen} backlog=4096;
        client_max_body_size 0;
        location /v1/api/ws {{
{_WS_PROXY}            proxy_pass http://a;
        }}
        location / {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            proxy_pass http://a;
        }}
    }}
}}
"""
    )


def prepare_dirs(workdir: Path, name: str) -> None:
    """Create the temp-path folders nginx expects for instance ``name``."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / f"{name}_temp" / sub).mkdir(parents=True, exist_ok=True)
