"""The doctor's findings as data, and their two renderings (text for people, one JSON document for tools).

Contract: pure (no I/O). A :class:`Report` is the ordered list of :class:`Step` results; the walk stops at the
first failure, so every step after it is ``not_run``. :func:`exit_status` is 0 when nothing failed and 1
otherwise (a config that does not load never gets this far: the command line exits 2 first). Nothing here ever
holds a secret: step details are built from public facts (key sizes, fingerprints of *public* keys, host names,
IBKR's error text, account ids).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.hints import Hint

__all__ = ["STEPS", "Report", "Status", "Step", "exit_status", "render_json", "render_text"]


class Status(enum.StrEnum):
    """How one step ended. ``warn`` passes with a remark; ``skipped`` does not apply here (e.g. TLS over http)."""

    OK = "ok"
    WARN = "warn"
    SKIPPED = "skipped"
    FAIL = "fail"
    NOT_RUN = "not_run"


#: ``(name, title)`` of every step, in the order they run.
STEPS: tuple[tuple[str, str], ...] = (
    ("config", "config file and credentials load"),
    ("keys", "key files and DH parameters (offline)"),
    ("dns", "resolve IBKR's host"),
    ("tcp", "open a TCP connection"),
    ("tls", "TLS handshake and certificate"),
    ("clock", "clock agrees with IBKR's"),
    ("live_session_token", "live session token request"),
    ("lst_validation", "live session token validates"),
    ("brokerage_session", "brokerage session opens (ssodh/init)"),
    ("tickle", "tickle keeps the session"),
    ("accounts", "brokerage accounts (/iserver/accounts)"),
    ("websocket", "WebSocket opens and IBKR speaks first"),
    ("query_rule", "IBKR accepts the query-signing rule"),
    ("snapshot", "market-data snapshot (with pre-flight)"),
)
_TITLES = dict(STEPS)


@dataclass(frozen=True, slots=True)
class Step:
    """One step's result: ``detail`` says what was seen; a failed or warned step carries a :class:`Hint`."""

    name: str
    status: Status
    detail: str = ""
    hint: Hint | None = None

    @property
    def title(self) -> str:
        """The step's human title (:data:`STEPS`)."""
        return _TITLES.get(self.name, self.name)


@dataclass(frozen=True, slots=True)
class Report:
    """What the doctor found for ``config`` against ``upstream``. ``steps`` lists every step of :data:`STEPS`."""

    config: str
    upstream: str
    steps: tuple[Step, ...]
    notice: str = ""
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def failed(self) -> Step | None:
        """The step that failed, or ``None``."""
        return next((step for step in self.steps if step.status is Status.FAIL), None)


def complete(results: Sequence[Step]) -> tuple[Step, ...]:
    """``results`` (the steps that ran, in order) followed by ``not_run`` for every later step of :data:`STEPS`."""
    ran = {step.name for step in results}
    return (*results, *(Step(name, Status.NOT_RUN) for name, _ in STEPS if name not in ran))


def exit_status(report: Report) -> int:
    """0 when no step failed, else 1."""
    return 0 if report.failed is None else 1


_MARK = {Status.OK: "ok", Status.WARN: "warn", Status.SKIPPED: "skip", Status.FAIL: "FAIL", Status.NOT_RUN: "-"}


def render_text(report: Report) -> str:
    """The report for a terminal: one line per step, the failure's cause and fix, then a verdict line."""
    lines = [f"gateway doctor: {report.config} → {report.upstream}"]
    if report.notice:
        lines.append(f"note: {report.notice}")
    for step in report.steps:
        detail = f" — {step.detail}" if step.detail else ""
        if step.status is Status.NOT_RUN:
            detail = " (not run)"
        lines.append(f"  {_MARK[step.status]:<4}  {step.title}{detail}")
        if step.hint is not None and step.status in (Status.FAIL, Status.WARN):
            lines.append(f"        cause: {step.hint.cause}")
            lines.append(f"        fix:   {step.hint.fix}")
            if step.hint.keys:
                lines.append(f"        keys:  {', '.join(step.hint.keys)}")
    failed = report.failed
    if failed is None:
        warned = sum(step.status is Status.WARN for step in report.steps)
        lines.append("all checks passed" + (f" ({warned} warning(s))" if warned else "") + ": the gateway can run")
    else:
        lines.append(f"stopped at: {failed.title}")
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> str:
    """The report as one JSON document: ``{"ok", "config", "upstream", "notice", "failed", "facts", "steps"}``."""
    failed = report.failed
    document = {
        "ok": failed is None,
        "config": report.config,
        "upstream": report.upstream,
        "notice": report.notice,
        "failed": failed.name if failed is not None else None,
        "facts": report.facts,
        "steps": [
            {
                "name": step.name,
                "title": step.title,
                "status": step.status.value,
                "detail": step.detail,
                "hint": step.hint.as_dict() if step.hint is not None else None,
            }
            for step in report.steps
        ],
    }
    return json.dumps(document, indent=2) + "\n"
