"""What the simulator received and what it decided: one :class:`Record` per request, plus per-endpoint counters.

In memory the records keep every header as received (tests may need the exact Authorization layout). The
admin path only ever sees :meth:`Record.redacted`, where credential-bearing header values are replaced.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

#: Header names whose values are replaced before leaving the process (admin path, echo route).
REDACTED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
REDACTED = "<redacted>"


def redact_headers(headers: tuple[tuple[str, str], ...]) -> list[list[str]]:
    """Headers as ``[name, value]`` pairs with credential-bearing values replaced by ``<redacted>``."""
    return [[name, REDACTED if name.lower() in REDACTED_HEADERS else value] for name, value in headers]


@dataclass(frozen=True, slots=True)
class Record:
    """One request and its verdict.

    ``endpoint`` is the route name counted in ``counts`` (e.g. ``/v1/api/tickle``; ``unknown`` for no route).
    ``rule`` is the query rule the signature matched (``guide``/``omit``/``in_url``) when one was checked.
    ``method`` is ``WS`` for events on an open WebSocket (``status`` is then the close code, if any).
    """

    seq: int
    time: float
    method: str
    path: str
    raw_query: str
    headers: tuple[tuple[str, str], ...]
    endpoint: str
    accepted: bool
    status: int
    reason: str
    rule: str | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def redacted(self) -> dict[str, Any]:
        """A JSON-ready dict with Authorization/Cookie values redacted."""
        return {
            "seq": self.seq,
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "raw_query": self.raw_query,
            "headers": redact_headers(self.headers),
            "endpoint": self.endpoint,
            "accepted": self.accepted,
            "status": self.status,
            "reason": self.reason,
            "rule": self.rule,
        }


class Recorder:
    """Keeps the last ``max_records`` records and counts every request per endpoint (counts are never trimmed)."""

    def __init__(self, max_records: int = 10_000) -> None:
        self._records: deque[Record] = deque(maxlen=max_records)
        self._counts: Counter[str] = Counter()
        self._seq = 0

    def add(
        self,
        *,
        time: float,
        method: str,
        path: str,
        raw_query: str,
        headers: tuple[tuple[str, str], ...],
        endpoint: str,
        accepted: bool,
        status: int,
        reason: str,
        rule: str | None = None,
        count: bool = True,
    ) -> Record:
        """Append a record (and count it under ``endpoint`` unless ``count`` is False)."""
        self._seq += 1
        record = Record(
            seq=self._seq,
            time=time,
            method=method,
            path=path,
            raw_query=raw_query,
            headers=headers,
            endpoint=endpoint,
            accepted=accepted,
            status=status,
            reason=reason,
            rule=rule,
        )
        self._records.append(record)
        if count:
            self._counts[endpoint] += 1
        return record

    @property
    def records(self) -> list[Record]:
        """A snapshot list of the retained records, oldest first."""
        return list(self._records)

    @property
    def counts(self) -> dict[str, int]:
        """A snapshot of requests per endpoint."""
        return dict(self._counts)

    def clear(self) -> None:
        """Forget records and counters."""
        self._records.clear()
        self._counts.clear()
