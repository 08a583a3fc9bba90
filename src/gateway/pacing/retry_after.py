"""Read an HTTP Retry-After header value as seconds from now (pure; the wall-clock time is an argument)."""

from __future__ import annotations

import email.utils
import math
import re

# RFC 9110 §10.2.3: delay-seconds is 1*DIGIT; a fraction is tolerated. Bounded so a hostile value stays cheap.
_SECONDS = re.compile(r"\d{1,12}(?:\.\d{1,9})?")
_MAX_DATE_CHARS = 64


def parse_retry_after(value: str | None, now_unix_s: float) -> float | None:
    """Seconds to wait according to a Retry-After value, or ``None`` when absent or unreadable.

    Accepts delay-seconds (``"120"``, also ``"1.5"``) and an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``),
    which is turned into seconds after ``now_unix_s`` (``0.0`` when the date is already past; a date without a zone
    is read as GMT, as HTTP-dates always are). Anything else — negative numbers, ``inf``/``nan``, exponents, junk — is
    ignored (``None``); it never raises.
    """
    if value is None:
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        return float(text)
    if not text or len(text) > _MAX_DATE_CHARS:
        return None
    try:
        parts = email.utils.parsedate_tz(text)
        if parts is None or parts[9] is None:
            return None
        when = float(email.utils.mktime_tz(parts))
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if not math.isfinite(when):
        return None
    return max(0.0, when - now_unix_s)
