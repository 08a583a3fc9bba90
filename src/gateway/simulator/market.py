"""Plausible market data for a handful of well-known instruments: quotes on a random walk, search, OHLC bars.

Not a market model - just numbers that look right to a client: prices move, bid < ask, high >= last >= low,
only changed fields are reported. All randomness comes from a seedable :class:`random.Random`; no I/O, no clock
(times are arguments).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Instrument:
    """Static description of one instrument."""

    conid: int
    symbol: str
    name: str
    exchange: str
    sec_type: str
    currency: str
    price: float
    decimals: int = 2


INSTRUMENTS: dict[int, Instrument] = {
    i.conid: i
    for i in (
        Instrument(265598, "AAPL", "APPLE INC", "NASDAQ", "STK", "USD", 227.50),
        Instrument(8314, "IBM", "INTL BUSINESS MACHINES CORP", "NYSE", "STK", "USD", 221.30),
        Instrument(272093, "MSFT", "MICROSOFT CORP", "NASDAQ", "STK", "USD", 415.80),
        Instrument(756733, "SPY", "SPDR S&P 500 ETF TRUST", "ARCA", "STK", "USD", 561.20),
        Instrument(76792991, "TSLA", "TESLA INC", "NASDAQ", "STK", "USD", 248.10),
        Instrument(4815747, "NVDA", "NVIDIA CORP", "NASDAQ", "STK", "USD", 118.40),
        Instrument(3691937, "AMZN", "AMAZON.COM INC", "NASDAQ", "STK", "USD", 186.90),
        Instrument(12087792, "EUR.USD", "European Monetary Union Euro", "IDEALPRO", "CASH", "USD", 1.08420, 5),
    )
}

#: Snapshot/streaming field ids the simulator knows (IBKR's numbering).
FIELD_LAST = "31"
FIELD_SYMBOL = "55"
FIELD_HIGH = "70"
FIELD_LOW = "71"
FIELD_CHANGE = "82"
FIELD_CHANGE_PCT = "83"
FIELD_BID = "84"
FIELD_ASK_SIZE = "85"
FIELD_ASK = "86"
FIELD_BID_SIZE = "88"
FIELD_COMPANY = "7051"
FIELD_OPEN = "7295"
FIELD_PRIOR_CLOSE = "7741"
FIELD_AVAILABILITY = "6509"
KNOWN_FIELDS = frozenset(
    {
        FIELD_LAST,
        FIELD_SYMBOL,
        FIELD_HIGH,
        FIELD_LOW,
        FIELD_CHANGE,
        FIELD_CHANGE_PCT,
        FIELD_BID,
        FIELD_ASK_SIZE,
        FIELD_ASK,
        FIELD_BID_SIZE,
        FIELD_COMPANY,
        FIELD_OPEN,
        FIELD_PRIOR_CLOSE,
        FIELD_AVAILABILITY,
    }
)
DEFAULT_FIELDS = (FIELD_LAST, FIELD_BID, FIELD_ASK)

_DURATION = re.compile(r"([1-9][0-9]{0,3})(min|h|d|w|m|y)")
_UNIT_S = {"min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}
MAX_BARS = 1000


def parse_duration_s(text: str) -> int | None:
    """Seconds in an IBKR period/bar string such as ``5min``, ``1h``, ``2d``, ``1w``, ``6m``, ``1y``; else None."""
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(slots=True)
class _Quote:
    last: float
    bid: float
    ask: float
    bid_size: int
    ask_size: int
    high: float
    low: float
    open: float
    prior_close: float


class Market:
    """Mutable quote state for :data:`INSTRUMENTS`, driven by a seedable RNG."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self._rng = random.Random(self._seed)  # noqa: S311 - market noise, not cryptography
        self._quotes: dict[int, _Quote] = {}
        for conid, inst in INSTRUMENTS.items():
            tick = 10.0**-inst.decimals
            last = round(inst.price, inst.decimals)
            self._quotes[conid] = _Quote(
                last=last,
                bid=round(last - tick, inst.decimals),
                ask=round(last + tick, inst.decimals),
                bid_size=100,
                ask_size=100,
                high=last,
                low=last,
                open=last,
                prior_close=round(last * 0.995, inst.decimals),
            )

    @staticmethod
    def instrument(conid: int) -> Instrument | None:
        """The instrument with ``conid``, or None."""
        return INSTRUMENTS.get(conid)

    def step(self, conid: int) -> None:
        """Advance one instrument's random walk by one tick (no-op for unknown conids)."""
        inst = INSTRUMENTS.get(conid)
        if inst is None:
            return
        quote = self._quotes[conid]
        tick = 10.0**-inst.decimals
        move = quote.last * self._rng.gauss(0.0, 0.0008)
        if abs(move) < tick:
            move = tick if self._rng.random() < 0.5 else -tick
        last = round(max(tick, quote.last + move), inst.decimals)
        spread = tick * self._rng.randint(1, 3)
        quote.last = last
        quote.bid = round(last - spread, inst.decimals)
        quote.ask = round(last + spread, inst.decimals)
        quote.bid_size = 100 * self._rng.randint(1, 40)
        quote.ask_size = 100 * self._rng.randint(1, 40)
        quote.high = max(quote.high, last)
        quote.low = min(quote.low, last)

    def fields(self, conid: int, field_ids: tuple[str, ...]) -> dict[str, str]:
        """Current values (IBKR formats them as strings) of the requested fields; unknown ids are left out."""
        inst = INSTRUMENTS.get(conid)
        if inst is None:
            return {}
        quote = self._quotes[conid]
        fmt = f"{{:.{inst.decimals}f}}"
        change = quote.last - quote.prior_close
        values = {
            FIELD_LAST: fmt.format(quote.last),
            FIELD_SYMBOL: inst.symbol,
            FIELD_HIGH: fmt.format(quote.high),
            FIELD_LOW: fmt.format(quote.low),
            FIELD_CHANGE: ("+" if change > 0 else "") + fmt.format(change),
            FIELD_CHANGE_PCT: f"{100.0 * change / quote.prior_close:.2f}",
            FIELD_BID: fmt.format(quote.bid),
            FIELD_ASK_SIZE: str(quote.ask_size),
            FIELD_ASK: fmt.format(quote.ask),
            FIELD_BID_SIZE: str(quote.bid_size),
            FIELD_COMPANY: inst.name,
            FIELD_OPEN: fmt.format(quote.open),
            FIELD_PRIOR_CLOSE: fmt.format(quote.prior_close),
            FIELD_AVAILABILITY: "RpB",
        }
        return {fid: values[fid] for fid in field_ids if fid in values}

    def snapshot(self, conid: int, field_ids: tuple[str, ...], now_ms: int) -> dict[str, Any]:
        """One element of a ``/iserver/marketdata/snapshot`` answer (advances the walk one tick)."""
        self.step(conid)
        entry: dict[str, Any] = {
            "conid": conid,
            "conidEx": str(conid),
            "_updated": now_ms,
            "server_id": "q0",
            "6119": "q0",
        }
        entry.update(self.fields(conid, field_ids))
        return entry

    @staticmethod
    def search(symbol: str, *, by_name: bool = False) -> list[dict[str, Any]]:
        """``/iserver/secdef/search`` results: exact symbol match (or name substring when ``by_name``)."""
        needle = symbol.strip().upper()
        out: list[dict[str, Any]] = []
        if not needle:
            return out
        for inst in INSTRUMENTS.values():
            hit = inst.symbol == needle or (by_name and needle in inst.name.upper())
            if not hit:
                continue
            sections: list[dict[str, Any]] = [{"secType": inst.sec_type}]
            if inst.sec_type == "STK":
                sections += [{"secType": "OPT", "months": "JAN26;FEB26;MAR26", "exchange": "SMART"}]
            out.append(
                {
                    "conid": str(inst.conid),
                    "companyHeader": f"{inst.name} - {inst.exchange}",
                    "companyName": inst.name,
                    "symbol": inst.symbol,
                    "description": inst.exchange,
                    "restricted": None,
                    "fop": None,
                    "opt": "20260116;20260220" if inst.sec_type == "STK" else None,
                    "war": None,
                    "sections": sections,
                }
            )
        return out

    def history(self, conid: int, period: str, bar: str, now_ms: int) -> dict[str, Any]:
        """A ``/iserver/marketdata/history`` answer: up to :data:`MAX_BARS` generated OHLCV bars ending at
        ``now_ms`` (floored to the bar length). Deterministic for the same seed, query and end bar.

        Raises ValueError (with a client-safe message) for an unknown conid or a malformed period/bar.
        """
        inst = INSTRUMENTS.get(conid)
        if inst is None:
            raise ValueError("chart data unavailable")
        period_s = parse_duration_s(period)
        bar_s = parse_duration_s(bar)
        if period_s is None:
            raise ValueError("invalid period")
        if bar_s is None or bar_s > period_s:
            raise ValueError("invalid bar")
        bar_ms = bar_s * 1000
        count = max(1, min(MAX_BARS, period_s // bar_s))
        end = (now_ms // bar_ms) * bar_ms
        start = end - (count - 1) * bar_ms
        key = f"{self._seed}:{conid}:{period_s}:{bar_s}:{end}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))  # noqa: S311
        price = self._quotes[conid].last * math.exp(rng.gauss(0.0, 0.02))
        data: list[dict[str, Any]] = []
        vol = 0.002 * math.sqrt(bar_s / 60.0)
        for i in range(count):
            open_ = price
            close = max(10.0**-inst.decimals, open_ * math.exp(rng.gauss(0.0, vol)))
            high = max(open_, close) * (1.0 + abs(rng.gauss(0.0, vol / 2)))
            low = min(open_, close) * (1.0 - abs(rng.gauss(0.0, vol / 2)))
            data.append(
                {
                    "o": round(open_, inst.decimals),
                    "c": round(close, inst.decimals),
                    "h": round(high, inst.decimals),
                    "l": round(low, inst.decimals),
                    "v": float(rng.randint(100, 50_000)),
                    "t": start + i * bar_ms,
                }
            )
            price = close
        started = datetime.fromtimestamp(start / 1000, tz=UTC).strftime("%Y%m%d-%H:%M:%S")
        return {
            "serverId": "sim",
            "symbol": inst.symbol,
            "text": inst.name,
            "priceFactor": 1,
            "startTime": started,
            "high": f"{max(b['h'] for b in data)}",
            "low": f"{min(b['l'] for b in data)}",
            "timePeriod": period,
            "barLength": bar_s,
            "mdAvailability": "S",
            "mktDataDelay": 0,
            "outsideRth": False,
            "volumeFactor": 1,
            "priceDisplayRule": 1,
            "priceDisplayValue": str(inst.decimals),
            "negativeCapable": False,
            "messageVersion": 2,
            "data": data,
            "points": len(data) - 1,
            "travelTime": 3,
        }
