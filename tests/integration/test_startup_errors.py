"""Starting where the gateway cannot listen: one line that names the address and the setting to change, exit 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    """Port 5000 is taken on many Macs (the AirPlay receiver): no traceback, the address, the key and the variable."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
        env["GATEWAY__SERVER__PORT"] = str(port)
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "--config", "gateway.toml"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "ExceptionGroup" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "[server] port" in line and "gateway.toml" in line and "GATEWAY__SERVER__PORT" in line
