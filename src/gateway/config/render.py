"""Writes a complete, commented gateway TOML from values, with every key documented from the schema (pure).

``tomli_w`` serialises each value (so quoting and escaping are always valid TOML); the comments come from
:data:`gateway.config.schema.SECTIONS`, the same table the parser checks against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tomli_w

from gateway.config import schema

DEFAULT_ROUTES: tuple[Mapping[str, object], ...] = (
    {"path": "/v1/api/iserver/*"},
    {"path": "/v1/api/portfolio/*"},
    {"path": "/v1/api/trsv/*"},
    {"path": "/v1/api/fyi/*"},
    {"path": "/v1/api/pa/*", "methods": ["POST"]},
    {"path": "/v1/api/ws"},
)
"""Routes written by ``init`` and used by the default config: the usual REST families and the WebSocket."""


def _assignment(key: str, value: object) -> str:
    return tomli_w.dumps({key: value}).rstrip("\n")


def render_config(
    values: Mapping[str, Mapping[str, object]],
    *,
    routes: Sequence[Mapping[str, object]] = DEFAULT_ROUTES,
    header: str = "",
    notes: Mapping[str, str] | None = None,
) -> str:
    """Render a config with every known key: given values where present, defaults otherwise.

    Keys with no value and no default are written as comments (``# key = ...``) so the file stays valid and
    the reader sees what could go there. ``notes`` maps ``section.key`` to one more comment line, written under the
    key's documentation. Raises ``KeyError`` for a section or key the schema does not know.
    """
    notes = notes or {}
    for dotted in notes:
        section, _, key = dotted.partition(".")
        if key not in schema.SECTIONS.get(section, {}):
            raise KeyError(dotted)
    lines: list[str] = []
    if header:
        lines += [f"# {line}" if line else "#" for line in header.splitlines()]
        lines.append("")
    for section, given in values.items():
        for key in given:
            if key not in schema.SECTIONS[section]:
                raise KeyError(f"{section}.{key}")
    for section, keys in schema.SECTIONS.items():
        given = values.get(section, {})
        lines.append(f"[{section}]")
        for key, spec in keys.items():
            lines.append(f"# {spec.doc}")
            if f"{section}.{key}" in notes:
                lines.append(f"# {notes[section + '.' + key]}")
            if key in given:
                lines.append(_assignment(key, given[key]))
            elif spec.default is not None:
                lines.append(_assignment(key, spec.default))
            else:
                lines.append(f"# {key} = ...")
        lines.append("")
    for route in routes:
        lines.append("[[routes]]")
        for key, value in route.items():
            if key not in schema.ROUTE_KEYS:
                raise KeyError(f"routes.{key}")
            lines.append(_assignment(key, value))
        lines.append("")
    return "\n".join(lines)
