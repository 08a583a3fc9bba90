"""What a config reload (SIGHUP) may change in a running gateway, and the config in force after it (pure).

Applied live: ``[[routes]]``, all of ``[pacing]``, ``logging.level``, and the ``[server]`` request checks
(:data:`LIVE_SERVER_KEYS`: trusted proxies, allowed origins, API keys and the opt-in to go without them, size
limits, ``/metrics`` access). Everything else — credentials and the rest of ``[ibkr]``, the listen address and
socket timeouts, ``[upstream]``, ``[session]``, ``[websocket]``, ``[simulator]``, ``logging.format`` — is bound
into objects built at start (the session, the upstream client, the listening socket) and needs a restart; a reload
that changes it says so and keeps the running value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gateway.config.model import Config
from gateway.redact import Secret

LIVE_SERVER_KEYS = (
    "trusted_proxies",
    "allowed_origins",
    "api_keys_file",
    "api_keys",
    "allow_network_without_api_keys",
    "max_body_bytes",
    "max_header_bytes",
    "max_header_count",
    "metrics",
)
SECTIONS = ("server", "ibkr", "upstream", "pacing", "session", "websocket", "simulator", "logging")


def _live(section: str, key: str) -> bool:
    return (
        section == "pacing"
        or (section == "server" and key in LIVE_SERVER_KEYS)
        or (section == "logging" and key == "level")
    )


def _plain(value: Any) -> Any:
    return value.reveal() if isinstance(value, Secret) else value


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """``config``: what is in force after the reload; ``applied``/``restart_needed``: changed dotted keys (names
    only, never values — some are secrets)."""

    config: Config
    applied: tuple[str, ...]
    restart_needed: tuple[str, ...]


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Merge ``new`` into ``running`` as far as it can be applied live; see the module docstring."""
    applied: list[str] = []
    restart: list[str] = []
    merged: dict[str, Any] = {}
    for section in SECTIONS:
        old_part, new_part = getattr(running, section), getattr(new, section)
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(old_part):
            old_value, new_value = getattr(old_part, f.name), getattr(new_part, f.name)
            if _plain(old_value) == _plain(new_value):
                continue
            dotted = f"{section}.{f.name}"
            if _live(section, f.name):
                applied.append(dotted)
                changes[f.name] = new_value
            else:
                restart.append(dotted)
        merged[section] = dataclasses.replace(old_part, **changes)
    if running.routes != new.routes:
        applied.append("routes")
    config = dataclasses.replace(running, routes=new.routes, **merged)
    return ReloadPlan(config=config, applied=tuple(applied), restart_needed=tuple(restart))
