"""Outbound pacing toward IBKR: global and per-endpoint budgets, bounded queueing, and the upstream-429 breaker.

Pure core: :mod:`.model` (rules and settings), :mod:`.bucket` (rate budgets), :mod:`.breaker` (429 breaker),
:mod:`.retry_after` (header parsing), :mod:`.scheduler` (the queue as a state machine). Shell: :mod:`.pacer` (trio).
"""

from gateway.pacing.model import IBKR_DEFAULT_LIMITS, Limit, PacingSettings, match_limit, settings_problems
from gateway.pacing.pacer import Pacer

__all__ = ["IBKR_DEFAULT_LIMITS", "Limit", "Pacer", "PacingSettings", "match_limit", "settings_problems"]
