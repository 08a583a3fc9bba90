"""The configuration reference, ``docs/configuration.md``, rendered from the schema table (pure).

Contract: :func:`render_reference` returns the whole document as Markdown. Every key of
:data:`gateway.config.schema.SECTIONS` and :data:`gateway.config.schema.ROUTE_KEYS` is one table row holding its
name, its default and its meaning (``doc`` then ``details``); IBKR's built-in pacing limits are rendered from
:data:`gateway.pacing.model.IBKR_DEFAULT_LIMITS`. The prose around the tables lives here. The committed document is
exactly this function's output: ``python -m gateway config-docs --output docs/configuration.md`` writes it, and a
test fails when the two differ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from gateway.config import schema
from gateway.pacing.model import API, IBKR_DEFAULT_LIMITS, Limit

COMMAND = "python -m gateway config-docs --output docs/configuration.md"
"""The command that regenerates the committed reference."""

_ROUTE_REQUIRED = frozenset({"path"})

_PREAMBLE = f"""\
# Configuration reference

<!-- Generated from src/gateway/config/schema.py by `{COMMAND}`; edit the schema, not this file. -->

The gateway reads one TOML file, given with `--config`. This page lists every key with its default and meaning;
it is generated from the same table the parser checks against, so it cannot drift from the code.

Contents: [the file](#the-file) · [environment overrides](#environment-overrides) ·
[secrets and file permissions](#secrets-and-file-permissions) · [files the gateway refuses](#files-the-gateway-refuses)
· {{sections}} · [`[[routes]]`](#routes)

## The file

TOML. Paths to key files are relative to the folder of the config file. Unknown sections, unknown keys and
unknown `GATEWAY__…` variables are errors, never silently ignored. `python -m gateway check --config F` checks a
file and its key files without starting anything. A bad config — at `check`, at start or on reload — is reported
all at once, one line per problem naming the file, line, key and what is wrong, and `check` and start exit with
status 2.

A running gateway re-reads its file on `SIGHUP`; which keys apply at once and which need a restart is in
[reloading](operations.md#reloading).

## Environment overrides

Every key except those of `[[routes]]` can be set by an environment variable `GATEWAY__<SECTION>__<KEY>`, which
wins over the file: `GATEWAY__SERVER__PORT=5001`, `GATEWAY__IBKR__ACCESS_TOKEN_SECRET=…`,
`GATEWAY__SERVER__ALLOWED_ORIGINS='["https://dash.example.com"]'`. String keys take the value as it is; other
keys take a TOML value. So production secrets need not sit in the file. A reload uses the overrides the gateway
started with.

## Secrets and file permissions

`check` and `run` warn about every file holding a secret that its group or others may read — the two private
keys, `server.api_keys_file`, and the config file itself when it holds `ibkr.access_token_secret` or
`server.api_keys` — and print the `chmod 600` that fixes it. The DH parameter file holds nothing secret and is
not checked.

## Files the gateway refuses

The config file, the PEM key files and `api_keys_file` must each be a regular file of at most 1 MiB: a named pipe,
a device (`/dev/stdin`, `/dev/zero`), a socket or a directory is refused without being read. So is a config that
is not UTF-8, is not valid TOML, nests arrays or tables too deeply (a few hundred levels) or has a key or table
name of more than 32 dotted parts. `check` and start then exit with status 2 and one line per problem, for example
`error: /dev/zero: config file is not a regular file (it is a character device)`.
"""

_SECTION_INTROS: Mapping[str, str] = {
    "server": "The listening side: address, who may connect, and the limits every client connection lives under.",
    "ibkr": (
        "IBKR's side: the credentials from the self-service portal (see [IBKR set-up](ibkr-setup.md)) and how "
        "requests are signed. The credentials are required unless `[simulator] enabled = true`."
    ),
    "upstream": "Deadlines for the gateway's connections to IBKR.",
    "pacing": (
        "IBKR answers a client that exceeds its request limits with 429 and may put the IP address in a penalty box "
        "for 10 to 15 minutes. The gateway holds its traffic to those limits so that never happens; see "
        "[IBKR's built-in limits](#ibkrs-built-in-limits) below."
    ),
    "session": "The session the gateway keeps open: tickles, back-off after failures, and how long a request waits.",
    "websocket": (
        "The WebSocket endpoint `/v1/api/ws`: relay or shared mode, and IBKR's keep-alive. See "
        "[WebSocket](websocket.md)."
    ),
    "simulator": (
        "The built-in IBKR simulator, for offline runs and tests. Its IBKR rules are on by default; see "
        "[testing your bot](testing-your-bot.md)."
    ),
    "logging": "Logs go to stderr.",
}

_PACING_OUTRO = f"""\
### IBKR's built-in limits

IBKR's documented per-endpoint limits are built in; a rule in `limits` for the same method and path replaces one.
Each applies besides the global rate (paths below `{API}`):

{{limits}}

The session's own calls (the live session token, `ssodh/init`, one tickle a minute) are never queued behind client
traffic. `/session` shows the queue, the rejections, IBKR's 429s and the breaker.
"""

_ROUTES = """\
## `[[routes]]`

The allow-list of proxied paths: a request for any other path is answered 404 with a JSON body and never forwarded.
Give one `[[routes]]` table per path.

{table}

WebSocket upgrades are relayed on IBKR's WebSocket endpoint `/v1/api/ws` only, and only when a route allows that
path (the default config lists it). The relay presents the session's cookie, which no other endpoint may receive,
so an upgrade anywhere else is refused with 403, even under a wildcard route. The IBKR session's own control
endpoints are refused under any route (see [what to expose](security.md#what-to-expose)).
"""


def format_default(value: object) -> str:
    """A default as it would be written in TOML (``"text"``, ``5``, ``true``, ``["a", "b"]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_default(item) for item in value) + "]"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _meaning(key: schema.Key) -> str:
    return _cell(key.doc + (f". {key.details}" if key.details else ""))


def _default(key: schema.Key, *, required: bool) -> str:
    if key.default is not None:
        return f"`{format_default(key.default)}`"
    return "required" if required else "none"


def key_table(keys: Mapping[str, schema.Key], *, required: frozenset[str] = frozenset()) -> str:
    """One Markdown table, a row per key: name, default, meaning. Keys in ``required`` (or credential keys) with no
    default read "required", others with no default read "none"."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, key in keys.items():
        default = _default(key, required=key.credential or name in required)
        rows.append(f"| `{name}` | {default} | {_meaning(key)} |")
    return "\n".join(rows)


def _rate(limit: Limit) -> str:
    if limit.requests == 0 and limit.max_concurrent is not None:
        return f"at most {limit.max_concurrent} at once"
    per = {1: "second", 5: "5 s", 60: "minute", 900: "15 min"}.get(int(limit.per_s), f"{limit.per_s:g} s")
    rate = f"{limit.requests:g} per {per}"
    return rate if limit.max_concurrent is None else f"{rate}, at most {limit.max_concurrent} at once"


def limits_table(limits: tuple[Limit, ...] = IBKR_DEFAULT_LIMITS) -> str:
    """IBKR's built-in per-endpoint limits as a Markdown table."""
    rows = ["| method | path | limit |", "|---|---|---|"]
    for limit in limits:
        path = limit.path.removeprefix(API)
        rows.append(f"| {limit.method or 'any'} | `{path}` | {_rate(limit)} |")
    return "\n".join(rows)


def _anchor(section: str) -> str:
    return f"[`[{section}]`](#{section})"


def render_reference() -> str:
    """The whole configuration reference as Markdown (see the module contract)."""
    sections = " · ".join(_anchor(section) for section in schema.SECTIONS)
    parts = [_PREAMBLE.format(sections=sections)]
    for section, keys in schema.SECTIONS.items():
        intro = _SECTION_INTROS.get(section, "")
        parts.append(f"## `[{section}]`\n\n" + (f"{intro}\n\n" if intro else "") + key_table(keys) + "\n")
        if section == "pacing":
            parts.append(_PACING_OUTRO.format(limits=limits_table()))
    parts.append(_ROUTES.format(table=key_table(schema.ROUTE_KEYS, required=_ROUTE_REQUIRED)))
    return "\n".join(parts)
