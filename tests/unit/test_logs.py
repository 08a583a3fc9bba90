"""Logging: secret forms, scrubbing through the configured handler (text and JSON), third-party level caps."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest

from gateway import logs
from gateway.logs import (
    REQUEST_ID,
    JsonFormatter,
    RedactingFilter,
    configure_logging,
    register_secret,
    scrub,
    secret_forms,
)

THIRD_PARTY = ("httpx", "httpcore", "hpack", "trio-websocket", "trio_websocket", "hypercorn.access", "quart")

Configure = Callable[[str, str], io.StringIO]


@pytest.fixture(autouse=True)
def isolated_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers its own throwaway secrets; the process-wide set is put back afterwards."""
    monkeypatch.setattr(logs, "_secrets", set())


@pytest.fixture
def configure() -> Iterator[Configure]:
    """``configure(level, fmt)`` runs :func:`configure_logging` into a fresh buffer; root and caps are restored."""
    root = logging.getLogger()
    saved_handlers = list(root.handlers)
    saved_level = root.level
    watched = (*THIRD_PARTY, "x", "gateway.test")
    saved_levels = {name: logging.getLogger(name).level for name in watched}

    def run(level: str, fmt: str) -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(level, fmt, stream=buffer)
        return buffer

    yield run
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def _new_secret() -> str:
    # reserved characters so that the URL-encoded form differs from the raw one
    return f"tok/{secrets.token_hex(8)}+x=y z"


# --- secret_forms / scrub --------------------------------------------------------------------------------------


def test_secret_forms_of_a_string() -> None:
    value = "abc/def+ghi="
    assert secret_forms(value) == {
        value,
        "abc%2Fdef%2Bghi%3D",
        base64.b64encode(value.encode()).decode(),
        value.encode().hex(),
    }


def test_secret_forms_of_bytes() -> None:
    raw = bytes(range(250, 256)) + b"\x00\x01"
    assert secret_forms(raw) == {base64.b64encode(raw).decode(), raw.hex()}
    assert "abcdefgh" in secret_forms(b"abcdefgh")  # ASCII bytes may also appear as themselves


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", set()),  # every form shorter than 8 characters: never scrub fragments that common
        ("short", {"c2hvcnQ=", "73686f7274"}),
        ("", set()),
        (b"", set()),
    ],
)
def test_short_forms_are_not_registered(value: str | bytes, expected: set[str]) -> None:
    assert secret_forms(value) == expected


def test_scrub_replaces_every_occurrence_and_the_longest_secret_first() -> None:
    register_secret("abcdefgh")
    register_secret("abcdefghijkl")
    assert scrub("x abcdefghijkl y abcdefgh z abcdefgh") == "x *** y *** z ***"


def test_scrub_leaves_text_without_secrets_alone() -> None:
    register_secret(_new_secret())
    assert scrub("nothing to see, tok/ 1234") == "nothing to see, tok/ 1234"


# --- through configure_logging ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        lambda s: s,
        lambda s: base64.b64encode(s.encode()).decode(),
        lambda s: s.encode().hex(),
        lambda s: quote(s, safe=""),
    ],
    ids=["raw", "base64", "hex", "url"],
)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_registered_secret_is_scrubbed_in_every_form(
    configure: Configure, form: Callable[[str], str], fmt: str
) -> None:
    secret = _new_secret()
    register_secret(secret)
    shown = form(secret)
    buffer = configure("debug", fmt)
    logging.getLogger("x").info("token %s", shown)
    logging.getLogger("gateway.test").debug("headers %r", {"authorization": f"OAuth oauth_token={shown}"})
    out = buffer.getvalue()
    assert shown not in out
    assert secret not in out
    assert "token ***" in out
    assert "oauth_token=***" in out


def test_bytes_secret_is_scrubbed(configure: Configure) -> None:
    raw = secrets.token_bytes(32)
    register_secret(raw)
    buffer = configure("info", "text")
    logging.getLogger("x").info("lst=%s hex=%s", base64.b64encode(raw).decode(), raw.hex())
    out = buffer.getvalue()
    assert base64.b64encode(raw).decode() not in out
    assert raw.hex() not in out
    assert "lst=*** hex=***" in out


def test_secret_in_exception_text_is_scrubbed(configure: Configure) -> None:
    secret = _new_secret()
    register_secret(secret)
    buffer = configure("info", "text")
    try:
        try:
            raise KeyError(f"cause carries {secret}")
        except KeyError as cause:
            raise RuntimeError(f"upstream said {secret}") from cause
    except RuntimeError:
        logging.getLogger("x").exception("handshake failed")
    out = buffer.getvalue()
    assert secret not in out
    assert "handshake failed" in out
    assert "RuntimeError: upstream said ***" in out
    assert "cause carries ***" in out
    assert "Traceback" in out


def test_secret_registered_after_configuration_is_scrubbed(configure: Configure) -> None:
    buffer = configure("info", "text")
    secret = _new_secret()
    register_secret(secret)
    logging.getLogger("x").warning("late %s", secret)
    assert secret not in buffer.getvalue()
    assert "late ***" in buffer.getvalue()


def test_malformed_log_call_neither_raises_nor_leaks(configure: Configure, capsys: pytest.CaptureFixture[str]) -> None:
    # A wrong %-format in some log call is a bug in that call; logging must not turn it into an exception in the
    # caller (stdlib logging reports it via Handler.handleError instead), and must not leak the arguments.
    secret = _new_secret()
    register_secret(secret)
    buffer = configure("info", "text")
    logging.getLogger("x").info("%d items for %s", "many", secret)
    assert secret not in buffer.getvalue()
    assert secret not in capsys.readouterr().err


def test_json_lines_are_one_valid_object_each(configure: Configure) -> None:
    secret = _new_secret()
    register_secret(secret)
    buffer = configure("debug", "json")
    logging.getLogger("x").debug("plain")
    logging.getLogger("gateway.test").warning("two\nlines with %s", secret)
    try:
        raise ValueError(f"bad {secret}")
    except ValueError:
        logging.getLogger("x").error("failed", exc_info=True)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert all(isinstance(record, dict) for record in records)
    assert [(r["level"], r["logger"], r["message"]) for r in records] == [
        ("debug", "x", "plain"),
        ("warning", "gateway.test", "two\nlines with ***"),
        ("error", "x", "failed"),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    assert "exception" not in records[0]
    assert "ValueError: bad ***" in records[2]["exception"]
    assert secret not in buffer.getvalue()


def test_json_formatter_without_filter_formats_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "m %s", ("a",), sys.exc_info())
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "m a"
    assert payload["level"] == "error"
    assert "ValueError: boom" in payload["exception"]


def test_filter_does_nothing_without_registered_secrets() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s", ("b",), None)
    assert RedactingFilter().filter(record) is True
    assert (record.msg, record.args) == ("a %s", ("b",))


def test_text_format_line(configure: Configure) -> None:
    buffer = configure("info", "text")
    logging.getLogger("gateway.test").info("hello %s", "world")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    gateway\.test: hello world\n", buffer.getvalue())


def test_configure_replaces_root_handlers_and_returns_its_handler(configure: Configure) -> None:
    configure("info", "text")
    first = list(logging.getLogger().handlers)
    configure("info", "json")
    second = list(logging.getLogger().handlers)
    assert len(first) == len(second) == 1
    assert first[0] is not second[0]
    assert isinstance(second[0].formatter, JsonFormatter)


@pytest.mark.parametrize("name", [*THIRD_PARTY, "httpcore.http11", "hpack.hpack"])
def test_third_party_loggers_are_capped_at_warning_in_debug(configure: Configure, name: str) -> None:
    buffer = configure("debug", "text")
    logger = logging.getLogger(name)
    logger.debug("dbg-line")
    logger.info("info-line")
    logger.warning("warn-line")
    logging.getLogger("gateway.test").debug("own-debug-line")
    out = buffer.getvalue()
    assert "dbg-line" not in out
    assert "info-line" not in out
    assert "warn-line" in out
    assert "own-debug-line" in out


def test_third_party_cap_follows_a_stricter_root_level(configure: Configure) -> None:
    buffer = configure("error", "text")
    logging.getLogger("httpx").warning("tp-warning")
    logging.getLogger("httpx").error("tp-error")
    logging.getLogger("gateway.test").warning("own-warning")
    out = buffer.getvalue()
    assert "tp-warning" not in out
    assert "tp-error" in out
    assert "own-warning" not in out


# --- request ids ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_lines_logged_while_handling_a_request_carry_its_id(configure: Configure, fmt: str) -> None:
    buffer = configure("info", fmt)
    token = REQUEST_ID.set("abc123-1f")
    try:
        logging.getLogger("gateway.test").info("inside")
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("gateway.test").info("outside")
    inside, outside = buffer.getvalue().splitlines()
    if fmt == "text":
        assert inside.endswith("gateway.test: [abc123-1f] inside")
        assert outside.endswith("gateway.test: outside")
    else:
        assert (json.loads(inside)["request_id"], json.loads(inside)["message"]) == ("abc123-1f", "inside")
        assert "request_id" not in json.loads(outside)
