"""The documentation is true: README's commands, its bot-testing example, and every docs/smoke-tests.md command.

The configuration reference is checked against the schema in tests/unit/test_config_reference.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SMOKE_TESTS = (REPO / "docs" / "smoke-tests.md").read_text()
BOT_GUIDE = (REPO / "docs" / "testing-your-bot.md").read_text()


def sh_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    blocks = sh_blocks(README)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_readme_first_command_runs_the_default_config() -> None:
    first = sh_blocks(README)[0].strip()
    assert first.endswith("python -m gateway --config gateway.toml")


def test_readme_links_every_document_in_docs() -> None:
    for document in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{document.name})" in README, f"README's table of contents does not link docs/{document.name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def running_default_gateway() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``python -m gateway --config gateway.toml`` as the README says, on a free port instead of 5000."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
    env["GATEWAY__SERVER__PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", "gateway.toml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"gateway did not become healthy: {proc.communicate()[1]}")
        time.sleep(0.1)
    yield port, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("block", sh_blocks(SMOKE_TESTS)[1:], ids=lambda b: b.strip().splitlines()[0][:60])
def test_smoke_test_command(
    running_default_gateway: tuple[int, subprocess.Popen[str]], block: str, request: pytest.FixtureRequest
) -> None:
    if re.search(r"\bcurl\b", block):
        request.getfixturevalue("curl_path")  # skips (fails under CI) without curl; the Python blocks still run
    port, _ = running_default_gateway
    expect = re.search(r"^# expect: (.*)$", block, flags=re.M)
    assert expect is not None, "every smoke-tests.md command states what it prints"
    script = block.replace("127.0.0.1:5000", f"127.0.0.1:{port}").replace(".venv/bin/python", sys.executable)
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert expect.group(1) in result.stdout, result.stdout


def test_sigterm_drains_and_logs_out(running_default_gateway: tuple[int, subprocess.Popen[str]]) -> None:
    _, proc = running_default_gateway
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in stderr
    assert "logged out of IBKR" in stderr
    assert "this is NOT IBKR" in stderr


def _bot_example(markdown: str) -> str:
    example = re.search(r"```python\n(# test_my_bot\.py.*?)```", markdown, flags=re.S)
    assert example is not None
    return example.group(1)


def test_bot_example_is_the_same_in_readme_and_guide() -> None:
    assert _bot_example(README) == _bot_example(BOT_GUIDE)


def test_readme_bot_example_passes_as_written(tmp_path: Path) -> None:
    """The README's example of a user's own test suite runs green with the installed pytest plugin."""
    example = _bot_example(README)
    (tmp_path / "test_my_bot.py").write_text(example)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY__", "PYTEST_"))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-o", "trio_mode=true", "-p", "no:cacheprovider", "test_my_bot.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{example.count('async def test_')} passed" in result.stdout
