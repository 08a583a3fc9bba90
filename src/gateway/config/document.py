"""Turns config text into a TOML document, refusing hostile input in one line instead of crashing or hanging (pure).

``tomllib`` alone is not safe on hostile text: arrays or tables nested a few hundred deep raise ``RecursionError``,
an integer of more than 4300 digits raises a plain ``ValueError``, and a dotted key of many parts
(``a.a.a…`` or ``[a.a.a…]``) costs time quadratic in its length — a 1 MiB file of them parses for hours.

Contract: :func:`parse_toml` returns the document or raises :class:`TomlRefused` carrying a one-line reason
(and the line, when known); it raises nothing else for any ``str`` input. Keys of more than
:data:`MAX_KEY_PARTS` dotted parts are refused before ``tomllib`` sees the text, so parsing is linear in its
length. The reason never quotes the text (a value may be a secret), only ``tomllib``'s own position messages.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

MAX_KEY_PARTS = 32
"""Most dotted parts in one key or table header (the gateway's own keys have at most three)."""

_LINE_POSITION = re.compile(r"at line (\d+)")
_STRING_OR_COMMENT_START = re.compile(r"[\"'#]")
_BASIC = re.compile(r'"(?:[^"\\\n]|\\.)*+"')
_LITERAL = re.compile(r"'[^'\n]*+'")
_MULTILINE_BASIC = re.compile(r'"""(?:[^"\\]|\\.|"{1,2}+(?!"))*+"""(?:"{1,2}+)?', re.S)
_MULTILINE_LITERAL = re.compile(r"'''.*?'''(?:'{1,2}+)?", re.S)
_KEY_PART = "[A-Za-z0-9_-]"
_LONG_KEY = re.compile(rf"(?<!{_KEY_PART})(?:{_KEY_PART}++[ \t]*+\.[ \t]*+){{{MAX_KEY_PARTS}}}{_KEY_PART}")


class TomlRefused(ValueError):
    """The text is not a usable TOML document. ``reason`` is one line; ``line`` is 1-based when known."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


def _without_strings(text: str) -> str:
    """``text`` with each string literal replaced by one key character and each comment by a space.

    Linear: the scan only moves forward, and an unterminated string ends it (``tomllib`` refuses that text at
    the string, after parsing only what was already scanned).
    """
    out: list[str] = []
    pos = 0
    while (found := _STRING_OR_COMMENT_START.search(text, pos)) is not None:
        start = found.start()
        out.append(text[pos:start])
        if text[start] == "#":
            end = text.find("\n", start)
            pos = len(text) if end < 0 else end
            out.append(" ")
            continue
        if text.startswith('"""', start):
            match = _MULTILINE_BASIC.match(text, start)
        elif text.startswith("'''", start):
            match = _MULTILINE_LITERAL.match(text, start)
        else:
            match = (_BASIC if text[start] == '"' else _LITERAL).match(text, start)
        if match is None:
            return "".join(out)
        out.append("q")
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


def _long_key_line(text: str) -> int | None:
    """The 1-based line of the first key or header of more than :data:`MAX_KEY_PARTS` parts, or ``None``."""
    bare = _without_strings(text)
    found = _LONG_KEY.search(bare)
    return None if found is None else bare.count("\n", 0, found.start()) + 1


def parse_toml(text: str) -> dict[str, Any]:
    """Parse ``text`` as TOML; see the module contract."""
    line = _long_key_line(text)
    if line is not None:
        raise TomlRefused(f"has a key or table name of more than {MAX_KEY_PARTS} dotted parts", line=line)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = " ".join(str(exc).split())
        position = _LINE_POSITION.search(message)
        raise TomlRefused(f"is not valid TOML: {message}", int(position.group(1)) if position else None) from None
    except RecursionError:
        raise TomlRefused("nests arrays or tables too deeply") from None
    except MemoryError:
        raise TomlRefused("is too large to parse") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (4300 digits)
        raise TomlRefused(f"is not valid TOML: {str(exc).split(';', 1)[0]}") from None
