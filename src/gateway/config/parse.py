"""Turns a parsed TOML document plus ``GATEWAY__*`` environment overrides into a :class:`Config` (pure).

Contract: :func:`parse_config` either returns a complete ``Config`` with the list of warnings, or raises
:class:`~gateway.errors.ConfigError` carrying *every* problem found (not just the first), each naming its source
(file or environment variable), its dotted key and what is wrong. Unknown sections and keys are errors. Secret
values never appear in a message. No file is read here: key paths are only resolved, not opened.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import schema
from gateway.config.document import TomlRefused, parse_toml
from gateway.config.model import (
    Config,
    IbkrConfig,
    LoggingConfig,
    PacingConfig,
    RouteConfig,
    ServerConfig,
    SessionConfig,
    SimulatorConfig,
    UpstreamConfig,
    WebSocketConfig,
)
from gateway.config.pacing import pacing_problems
from gateway.errors import ConfigError, ConfigProblem
from gateway.oauth.basestring import QueryRule
from gateway.oauth.signer import expected_realm
from gateway.redact import Secret
from gateway.session.paths import route_claims_session


@dataclass(frozen=True, slots=True)
class _Raw:
    """A raw value and where it came from (file path or environment variable name)."""

    value: object
    source: str


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _env_overrides(env: Mapping[str, str], problems: list[ConfigProblem]) -> dict[tuple[str, str], _Raw]:
    """Collect ``GATEWAY__<SECTION>__<KEY>`` overrides; unknown names are errors."""
    out: dict[tuple[str, str], _Raw] = {}
    for name in sorted(env):
        if not name.startswith(schema.ENV_PREFIX):
            continue
        parts = name[len(schema.ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            problems.append(ConfigProblem(name, "", "must be named GATEWAY__<SECTION>__<KEY>"))
            continue
        section, key = parts
        if section == "routes":
            problems.append(ConfigProblem(name, "routes", "routes can only be set in the config file"))
            continue
        if section not in schema.SECTIONS:
            problems.append(ConfigProblem(name, section, "unknown section" + _suggest(section, list(schema.SECTIONS))))
            continue
        spec = schema.SECTIONS[section].get(key)
        if spec is None:
            known = list(schema.SECTIONS[section])
            problems.append(ConfigProblem(name, f"{section}.{key}", "unknown key" + _suggest(key, known)))
            continue
        raw_text = env[name]
        if spec.takes_string:
            out[section, key] = _Raw(raw_text, name)
            continue
        try:
            value = parse_toml(f"v = {raw_text}")["v"]
        except TomlRefused as refused:
            syntax = refused.reason.startswith("is not valid TOML")
            reason = 'is not a TOML value (e.g. 5000, true, ["a", "b"])' if syntax else refused.reason
            problems.append(ConfigProblem(name, f"{section}.{key}", reason))
            continue
        out[section, key] = _Raw(value, name)
    return out


def _convert(spec: schema.Key, raw: _Raw, dotted: str, problems: list[ConfigProblem]) -> tuple[bool, Any]:
    """Run ``spec``'s converter; on failure record the problem. Converters never quote secret values."""
    try:
        return True, spec.convert(raw.value)
    except ValueError as exc:
        problems.append(ConfigProblem(raw.source, dotted, str(exc)))
        return False, None


def _parse_sections(
    data: Mapping[str, object],
    source: str,
    base_dir: Path,
    overrides: dict[tuple[str, str], _Raw],
    problems: list[ConfigProblem],
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Convert every section's keys; returns the values per section and the dotted keys explicitly given."""
    values: dict[str, dict[str, Any]] = {}
    given: set[str] = set()
    for section, keys in schema.SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            problems.append(ConfigProblem(source, section, "must be a table ([section])"))
            table = {}
        for key in table:
            if key not in keys:
                problems.append(ConfigProblem(source, f"{section}.{key}", "unknown key" + _suggest(key, list(keys))))
        values[section] = {}
        for key, spec in keys.items():
            dotted = f"{section}.{key}"
            raw = overrides.get((section, key))
            if raw is None and key in table:
                raw = _Raw(table[key], source)
            if raw is None:
                if spec.default is not None:
                    values[section][key] = spec.convert(spec.default)
                continue
            ok, value = _convert(spec, raw, dotted, problems)
            if not ok:
                continue
            if spec.path:
                value = base_dir / value
            if spec.secret:
                value = Secret(value)
            values[section][key] = value
            given.add(dotted)
    return values, given


def _parse_routes(data: Mapping[str, object], source: str, problems: list[ConfigProblem]) -> tuple[RouteConfig, ...]:
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.append(ConfigProblem(source, "routes", "must be an array of tables ([[routes]])"))
        return ()
    routes: list[RouteConfig] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(entry, dict):
            problems.append(ConfigProblem(source, where, "must be a table with a path"))
            continue
        for key in entry:
            if key not in schema.ROUTE_KEYS:
                problems.append(
                    ConfigProblem(source, f"{where}.{key}", "unknown key" + _suggest(key, list(schema.ROUTE_KEYS)))
                )
        if "path" not in entry:
            problems.append(ConfigProblem(source, f"{where}.path", "is required"))
            continue
        ok, path = _convert(schema.ROUTE_KEYS["path"], _Raw(entry["path"], source), f"{where}.path", problems)
        methods: tuple[str, ...] | None = None
        if "methods" in entry:
            ok_m, methods = _convert(
                schema.ROUTE_KEYS["methods"], _Raw(entry["methods"], source), f"{where}.methods", problems
            )
            if ok_m and not methods:
                problems.append(ConfigProblem(source, f"{where}.methods", "must list at least one method"))
                ok_m = False
            ok = ok and ok_m
        max_body: int | None = None
        if "max_body_bytes" in entry:
            ok_b, max_body = _convert(
                schema.ROUTE_KEYS["max_body_bytes"],
                _Raw(entry["max_body_bytes"], source),
                f"{where}.max_body_bytes",
                problems,
            )
            ok = ok and ok_b
        if not ok:
            continue
        if path in seen:
            problems.append(ConfigProblem(source, f"{where}.path", f"{path!r} is listed twice"))
            continue
        if route_claims_session(path):
            problems.append(
                ConfigProblem(
                    source,
                    f"{where}.path",
                    f"{path!r} controls the IBKR session, which the gateway owns: it is never forwarded "
                    "(remove this route)",
                )
            )
            continue
        seen.add(path)
        routes.append(RouteConfig(path=path, methods=methods, max_body_bytes=max_body))
    return tuple(routes)


def parse_config(
    data: Mapping[str, object],
    *,
    source: str,
    base_dir: Path,
    env: Mapping[str, str] | None = None,
) -> tuple[Config, list[ConfigProblem]]:
    """Validate ``data`` (a ``tomllib`` document) with ``env`` overrides applied; see the module contract.

    ``source`` names the file in messages; relative key paths are resolved against ``base_dir``. Returns the
    config and the warnings (problems of severity ``warning``).
    """
    problems: list[ConfigProblem] = []
    overrides = _env_overrides(env or {}, problems)
    for section in data:
        if section not in schema.SECTIONS and section != "routes":
            known = [*schema.SECTIONS, "routes"]
            problems.append(ConfigProblem(source, section, "unknown section" + _suggest(section, known)))
    values, given_keys = _parse_sections(data, source, base_dir, overrides, problems)
    routes = _parse_routes(data, source, problems)

    simulator_on = bool(values["simulator"].get("enabled", False))
    ibkr = values["ibkr"]
    for key, spec in schema.SECTIONS["ibkr"].items():
        if spec.credential and key not in ibkr and not simulator_on:
            env_name = f"{schema.ENV_PREFIX}IBKR__{key.upper()}"
            already = any(p.key == f"ibkr.{key}" for p in problems)
            if not already:
                problems.append(ConfigProblem(source, f"ibkr.{key}", f"is required (or set {env_name})"))
    if simulator_on:
        given = sorted(
            k for k, spec in schema.SECTIONS["ibkr"].items() if spec.credential and f"ibkr.{k}" in given_keys
        )
        if given:
            problems.append(
                ConfigProblem(
                    source,
                    "simulator.enabled",
                    f"is true, so ibkr credentials ({', '.join(given)}) and ibkr.base_url are ignored",
                    severity="warning",
                )
            )
    consumer_key = ibkr.get("consumer_key")
    realm = ibkr.get("realm", "limited_poa")
    if isinstance(consumer_key, str) and not simulator_on and realm != expected_realm(consumer_key):
        problems.append(
            ConfigProblem(
                source,
                "ibkr.realm",
                f"is {realm!r}, but IBKR expects {expected_realm(consumer_key)!r} for this consumer key "
                "(limited_poa for every real consumer key, test_realm only for TESTCONS)",
                severity="warning",
            )
        )
    pacing = values["pacing"]
    if pacing.get("breaker_max_cooldown_s", 0) < pacing.get("breaker_cooldown_s", 0):
        problems.append(
            ConfigProblem(source, "pacing.breaker_max_cooldown_s", "must not be smaller than breaker_cooldown_s")
        )
    session = values["session"]
    server = values["server"]
    if server.get("websocket_ping_interval_s", 0) >= server.get("read_timeout_s", 1):
        problems.append(
            ConfigProblem(
                source, "server.websocket_ping_interval_s", "must be shorter than read_timeout_s (or idle relays die)"
            )
        )
    if session.get("reconnect_max_delay_s", 0) < session.get("reconnect_delay_s", 0):
        problems.append(
            ConfigProblem(source, "session.reconnect_max_delay_s", "must not be smaller than reconnect_delay_s")
        )
    if not routes and not problems:
        problems.append(
            ConfigProblem(source, "routes", "no [[routes]] are configured: nothing will be proxied", "warning")
        )

    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        for key, message in pacing_problems(PacingConfig(**values["pacing"])):
            problems.append(ConfigProblem(source, f"pacing.{key}", message))
        errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(problems)
    config = Config(
        source=source,
        server=ServerConfig(**values["server"]),
        ibkr=IbkrConfig(**{**ibkr, "query_rule": QueryRule(ibkr.get("query_rule", "include"))}),
        upstream=UpstreamConfig(**values["upstream"]),
        pacing=PacingConfig(**values["pacing"]),
        session=SessionConfig(**session),
        websocket=WebSocketConfig(**values["websocket"]),
        simulator=SimulatorConfig(**values["simulator"]),
        logging=LoggingConfig(**values["logging"]),
        routes=routes,
    )
    return config, problems
