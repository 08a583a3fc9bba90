"""Turns ``[pacing]`` into the pacer's settings and checks them (pure)."""

from __future__ import annotations

from typing import cast

from gateway.config.model import PacingConfig
from gateway.pacing.model import IBKR_DEFAULT_LIMITS, Limit, PacingSettings, settings_problems

__all__ = ["pacing_problems", "pacing_settings"]


def pacing_settings(config: PacingConfig) -> PacingSettings:
    """The pacer's settings: the configured rules first, then IBKR's documented ones not overridden by them."""
    user = tuple(
        Limit(
            method=cast(str | None, rule["method"]),
            path=cast(str, rule["path"]),
            requests=cast(float, rule["requests"]),
            per_s=cast(float, rule["per_s"]),
            max_concurrent=cast(int | None, rule["max_concurrent"]),
        )
        for rule in config.limits
    )
    overridden = {(limit.method, limit.path) for limit in user}
    defaults = tuple(limit for limit in IBKR_DEFAULT_LIMITS if (limit.method, limit.path) not in overridden)
    return PacingSettings(
        enabled=config.enabled,
        global_requests_per_s=config.global_requests_per_s,
        global_burst=config.global_burst,
        max_wait_s=config.max_wait_s,
        breaker_cooldown_s=config.breaker_cooldown_s,
        breaker_max_cooldown_s=config.breaker_max_cooldown_s,
        send_margin_s=config.send_margin_s,
        limits=user + defaults,
    )


def pacing_problems(config: PacingConfig) -> list[tuple[str, str]]:
    """``(dotted key, message)`` for everything the pacer would refuse, keys relative to ``[pacing]``."""
    user_rules = len(config.limits)
    problems = []
    for key, message in settings_problems(pacing_settings(config)):
        if key.startswith("limits["):
            index = int(key[7 : key.index("]")])
            if index >= user_rules:
                continue  # a built-in rule; never wrong
        problems.append((key, message))
    return problems
