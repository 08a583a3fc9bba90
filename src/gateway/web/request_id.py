"""The ``X-Request-Id`` of each request: the client's own when well-formed, else a short one made here.

Generated ids are ``<process prefix>-<counter in hex>`` (e.g. ``k3f9qa-1f``): unique within the process, and
across restarts and instances thanks to the random 6-character prefix. A counter costs a fraction of ``uuid4()``
per request (no system call, no 128-bit formatting).
"""

from __future__ import annotations

import itertools
import re
import secrets
import string

HEADER = b"x-request-id"
MAX_LENGTH = 64
_VALID = re.compile(rb"[A-Za-z0-9._\-]{1,64}")
_ALPHABET = string.ascii_lowercase + string.digits
_PREFIX = "".join(secrets.choice(_ALPHABET) for _ in range(6)) + "-"
_counter = itertools.count(1)


def new_request_id() -> str:
    """A fresh id, unique in this process."""
    return f"{_PREFIX}{next(_counter):x}"


def is_valid(value: bytes) -> bool:
    """Whether a client-supplied id may be reused: 1–64 characters of ``[A-Za-z0-9._-]``."""
    return _VALID.fullmatch(value) is not None


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-Id`` if it is well-formed (and the only one), else a new id."""
    supplied: bytes | None = None
    for name, value in headers:  # ASGI header names are lower-case
        if name == HEADER:
            if supplied is not None:  # two of them: believe neither
                return new_request_id()
            supplied = value
    if supplied is not None and _VALID.fullmatch(supplied):
        return supplied.decode("ascii")
    return new_request_id()
