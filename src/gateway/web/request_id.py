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
from collections.abc import Iterable, Sequence

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


def choose_request_id(supplied: Sequence[bytes]) -> str:
    """The client's id when it sent exactly one ``X-Request-Id`` (``supplied``: every value) and it is well-formed
    (two of them: believe neither), else a new id."""
    if len(supplied) == 1 and _VALID.fullmatch(supplied[0]):
        return supplied[0].decode("ascii")
    return new_request_id()


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """:func:`choose_request_id` over a header list (ASGI names are lower-case): for a request that has no
    :class:`~gateway.edge.request.Request` because it was refused while parsed."""
    return choose_request_id([value for name, value in headers if name == HEADER])
