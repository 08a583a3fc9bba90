"""py-spy for the benchmark: install it if missing, record the gateway under load, summarise collapsed stacks.

Contract: :func:`record` samples a running process with ``py-spy record`` while ``load`` runs in a thread of this
process, and returns the load's result with the collapsed stacks. The process is paused briefly at each sample:
with ``--nonblocking`` most stacks came out torn, so that option is not used.
:func:`summarise` turns collapsed stacks into the top functions by inclusive and self share of samples.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

PY_SPY = "py-spy==0.4.3"  # same pin as the `bench` extra in pyproject.toml
_FRAME = re.compile(r"(?P<func>.*?) \((?P<path>.*?):\d+\)$")

T = TypeVar("T")


def ensure_py_spy(python: str) -> str:
    """The py-spy executable next to ``python`` (pip-installed there from PyPI when missing)."""
    local = Path(python).parent / "py-spy"
    if not local.exists() and shutil.which("py-spy") is None:
        subprocess.run([python, "-m", "pip", "install", "-q", PY_SPY], check=True, timeout=300)  # noqa: S603
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError(f"py-spy is not installed and `pip install {PY_SPY}` did not provide it")
    return found


def record(spy: str, pid: int, seconds: int, load: Callable[[], T], rate_hz: int = 100) -> tuple[T, str]:
    """Run ``load`` in a thread while py-spy samples ``pid`` for ``seconds``; the load's result and the stacks."""
    outcome: list[T] = []
    worker = threading.Thread(target=lambda: outcome.append(load()), daemon=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        worker.start()
        subprocess.run(  # noqa: S603 - fixed argv
            [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", str(rate_hz), "-f", "raw", "-o", str(out),
             ],
            check=True, capture_output=True, timeout=seconds + 60,
        )  # fmt: skip
        worker.join(timeout=seconds + 60)
        if not outcome:
            raise RuntimeError("the load generator did not finish")
        return outcome[0], out.read_text()


def _short(frame: str) -> str:
    """``func (dir/file.py)`` — the last two path parts, enough to tell trio's and hypercorn's modules apart."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['func']} ({'/'.join(match['path'].split('/')[-2:])})"


def summarise(folded: str, top: int = 40) -> str:
    """Top ``top`` functions by inclusive and by self share of all samples, as text."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.splitlines():
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [_short(frame) for frame in stack.split(";")]
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines) + "\n"
