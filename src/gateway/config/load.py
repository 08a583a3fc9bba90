"""Reads the TOML file, the environment and the key files, and returns checked configuration and credentials.

This is the shell around :mod:`gateway.config.parse`: it does the file I/O, then loads and cross-checks the key
material (the access-token secret must decrypt with the encryption key). Contract: :func:`load_config` returns a
:class:`LoadedConfig` or raises :class:`~gateway.errors.ConfigError` listing every problem, each naming the file,
the key and, where it can be found, the line. No message contains secret material.

Every file it reads — the config, the PEM key files, ``server.api_keys_file`` — must be a regular file of at most
1 MiB; a FIFO, device, socket or directory is refused without being read (and without blocking), and no read
goes past the limit. A file that holds a secret — the private keys, ``server.api_keys_file``, and the config itself
when it holds ``ibkr.access_token_secret`` or ``server.api_keys`` — gets a warning when group or others may read it
(:func:`_exposed_secret`); the DH parameter file is public and gets none. Hostile TOML (deep nesting, huge keys)
is refused by :mod:`gateway.config.document`.
A listen address beyond loopback with no API key is an error unless opted in (:mod:`gateway.config.exposure`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gateway.config.document import TomlRefused, parse_toml
from gateway.config.exposure import exposure_problem, host_source
from gateway.config.model import Config, Credentials
from gateway.config.parse import parse_config
from gateway.config.schema import api_key
from gateway.errors import ConfigError, ConfigProblem, KeyMaterialError, SecretDecryptError
from gateway.oauth.dh import DHParams, parse_dh_params_pem
from gateway.oauth.keys import decrypt_access_token_secret, load_rsa_private_key
from gateway.oauth.signer import OAuthIdentity
from gateway.redact import Secret


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A checked configuration. ``credentials`` is ``None`` when the simulator is enabled (it makes its own)."""

    config: Config
    credentials: Credentials | None
    warnings: tuple[ConfigProblem, ...]
    api_keys: Secret[tuple[str, ...]] = field(default_factory=lambda: Secret(()))
    """Every client API key (``server.api_keys`` plus the lines of ``server.api_keys_file``); empty = no auth."""


_Where = tuple[str, int | None, str]
"""``(section, route index or None, key)``; ``key`` is ``""`` for a section's header line."""

_ASSIGNMENT = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _line_index(text: str) -> dict[_Where, int]:
    """The first line of every header and bare ``key =`` in ``text``, in one pass (so locating every problem of a
    file with many is linear, not quadratic)."""
    index: dict[_Where, int] = {}
    section: str | None = None
    routes_seen = -1
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[[") and stripped.rstrip().endswith("]]"):
            section = stripped[2:-2].strip()
            if section == "routes":
                routes_seen += 1
                index.setdefault(("routes", routes_seen, ""), number)
            continue
        if stripped.startswith("["):
            section = stripped[1:].split("]", 1)[0].strip()
            index.setdefault((section, None, ""), number)
            continue
        match = _ASSIGNMENT.match(line)
        if section is not None and match is not None:
            index.setdefault((section, routes_seen if section == "routes" else None, match.group(1)), number)
    return index


def _where(dotted: str) -> _Where:
    """``section.key`` or ``routes[i].key`` (or a bare section / ``routes[i]``) as an index key."""
    head, _, key = dotted.partition(".")
    if head.startswith("routes[") and head.endswith("]") and head[7:-1].isdigit():
        return "routes", int(head[7:-1]), key
    return head, None, key


def _with_lines(problems: tuple[ConfigProblem, ...], path: str, text: str) -> list[ConfigProblem]:
    """Add line numbers (best effort) to the problems found in ``path`` and order them as they appear in the file."""
    index: dict[_Where, int] | None = None
    located = []
    for problem in problems:
        if problem.source == path and problem.line is None and problem.key:
            index = _line_index(text) if index is None else index
            problem = replace(problem, line=index.get(_where(problem.key)))
        located.append(problem)
    return sorted(located, key=lambda p: (p.source != path, p.line is None, p.line or 0))


MAX_CONFIG_FILE_BYTES = 1 << 20
"""The largest config file read (1 MiB; a complete config is a few KiB)."""
MAX_KEY_FILE_BYTES = 1 << 20
"""The largest key file read: PEM files and ``server.api_keys_file`` (1 MiB)."""

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_READ_CHUNK = 64 * 1024


class _Refused(Exception):
    """A file was not read. ``reason`` completes a sentence about the file: ``does not exist``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _limit_text(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"


def _check_regular(info: os.stat_result, limit: int) -> None:
    """Raise :class:`_Refused` unless ``info`` is a regular file of at most ``limit`` bytes."""
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        kinds = (
            (stat.S_ISDIR, "a directory"),
            (stat.S_ISFIFO, "a named pipe"),
            (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"),
        )
        kind = next((name for test, name in kinds if test(mode)), "a special file")
        raise _Refused(f"is not a regular file (it is {kind})")
    if info.st_size > limit:
        raise _Refused(f"is larger than the {_limit_text(limit)} limit ({info.st_size} bytes)")


def _read_regular_file(path: Path, limit: int) -> tuple[bytes, int]:
    """Read ``path`` if it is a regular file of at most ``limit`` bytes; return its bytes and its mode.

    Contract: never blocks and never reads more than ``limit + 1`` bytes. A FIFO, device, socket or directory is
    refused from ``stat`` before it is opened (opening some devices has effects); the open is non-blocking and
    the opened file is checked again with ``fstat``, so a file swapped in between is refused too. Raises
    :class:`_Refused` with a one-line reason that holds no file content.
    """
    try:
        _check_regular(path.stat(), limit)
    except FileNotFoundError:
        raise _Refused("does not exist") from None
    except OSError as exc:
        raise _Refused(f"cannot be examined: {exc.strerror}") from None
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise _Refused("does not exist") from None
    except OSError as exc:
        raise _Refused(f"cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        _check_regular(info, limit)
        chunks: list[bytes] = []
        left = limit + 1  # one byte more than allowed tells a file that grew since fstat
        while left > 0:
            chunk = os.read(fd, min(left, _READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise _Refused(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if left <= 0:
        raise _Refused(f"is larger than the {_limit_text(limit)} limit")
    return b"".join(chunks), info.st_mode


def _exposed_secret(path: Path | str, mode: int, source: str, key: str) -> ConfigProblem | None:
    """The warning for a file that holds a secret (named by ``key``) while group or others may read it, or
    ``None`` when its mode keeps it private. The one mode check for every file holding a secret."""
    if not mode & 0o077:
        return None
    return ConfigProblem(
        source,
        key,
        f"{path} is readable by group or others (mode {stat.S_IMODE(mode):04o}) but holds a secret; "
        f"run: chmod 600 {path}",
        severity="warning",
    )


def _read_key_file(
    path: Path, key: str, source: str, problems: list[ConfigProblem], *, secret: bool = True
) -> bytes | None:
    """Read one key file (see :func:`_read_regular_file`), recording a problem if it cannot be used and, when it
    holds a ``secret`` (not the public DH parameters), a warning if group or others may read it."""
    try:
        data, mode = _read_regular_file(path, MAX_KEY_FILE_BYTES)
    except _Refused as refused:
        problems.append(ConfigProblem(source, key, f"file {path} {refused.reason}"))
        return None
    exposed = _exposed_secret(path, mode, source, key) if secret else None
    if exposed is not None:
        problems.append(exposed)
    return data


_INLINE_SECRETS = (("ibkr", "access_token_secret"), ("server", "api_keys"))
"""Secrets a config file may hold itself (``section``, ``key``)."""


def _inline_secret(data: Mapping[str, object]) -> str | None:
    """The first secret key the config document itself holds (``ibkr.access_token_secret``), or ``None``."""
    for section, key in _INLINE_SECRETS:
        table = data.get(section)
        if isinstance(table, Mapping) and key in table:
            return f"{section}.{key}"
    return None


def load_credentials(config: Config, problems: list[ConfigProblem]) -> Credentials | None:
    """Load and cross-check the key material named in ``config.ibkr``; record every problem found.

    Returns ``None`` when anything is missing or wrong (the problems say what).
    """
    ibkr = config.ibkr
    source = config.source
    loaded: dict[str, object] = {}
    for key, path in (
        ("signature_key", ibkr.signature_key),
        ("encryption_key", ibkr.encryption_key),
        ("dh_param", ibkr.dh_param),
    ):
        if path is None:  # parse_config reports missing paths; nothing to load
            continue
        data = _read_key_file(path, f"ibkr.{key}", source, problems, secret=key != "dh_param")
        if data is None:
            continue
        try:
            if key == "dh_param":
                loaded[key] = parse_dh_params_pem(data)
            else:
                loaded[key] = load_rsa_private_key(data, what=f"{key.replace('_', ' ')} ({path})")
        except KeyMaterialError as exc:
            problems.append(ConfigProblem(source, f"ibkr.{key}", str(exc)))
    prepend: str | None = None
    encryption_key = loaded.get("encryption_key")
    if isinstance(encryption_key, RSAPrivateKey):
        try:
            prepend = decrypt_access_token_secret(encryption_key, ibkr.access_token_secret.reveal())
        except SecretDecryptError as exc:
            problems.append(
                ConfigProblem(
                    source,
                    "ibkr.access_token_secret",
                    f"does not decrypt with ibkr.encryption_key ({ibkr.encryption_key}): {exc}",
                )
            )
    signature_key = loaded.get("signature_key")
    dh = loaded.get("dh_param")
    if prepend is None or not isinstance(signature_key, RSAPrivateKey) or not isinstance(dh, DHParams):
        return None
    return Credentials(
        identity=OAuthIdentity(consumer_key=ibkr.consumer_key, access_token=ibkr.access_token, realm=ibkr.realm),
        signature_key=signature_key,
        prepend=Secret(prepend),
        dh=dh,
        query_rule=ibkr.query_rule,
    )


def load_api_keys(config: Config, problems: list[ConfigProblem]) -> tuple[str, ...]:
    """``server.api_keys`` plus the keys in ``server.api_keys_file`` (one per line, ``#`` comments allowed)."""
    keys = list(config.server.api_keys.reveal())
    path = config.server.api_keys_file
    if path is None:
        return tuple(keys)
    data = _read_key_file(path, "server.api_keys_file", config.source, problems)
    if data is None:
        return tuple(keys)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        problems.append(ConfigProblem(config.source, "server.api_keys_file", f"{path} is not UTF-8 text"))
        return tuple(keys)
    from_file = 0
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            keys.append(api_key(text))
            from_file += 1
        except ValueError as exc:
            problems.append(ConfigProblem(config.source, "server.api_keys_file", f"{path}:{number}: {exc}"))
    if from_file == 0:
        problems.append(ConfigProblem(config.source, "server.api_keys_file", f"{path} holds no key"))
    return tuple(keys)


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and check the config at ``path`` with ``env`` (default: ``os.environ``) overrides; see module contract."""
    file = Path(path)
    name = str(path)
    env = os.environ if env is None else env
    try:
        raw, mode = _read_regular_file(file, MAX_CONFIG_FILE_BYTES)
    except _Refused as refused:
        raise ConfigError([ConfigProblem(name, "", f"config file {refused.reason}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = ConfigProblem(name, "", f"is not UTF-8 text (invalid byte at offset {exc.start})")
        raise ConfigError([problem]) from None
    try:
        data = parse_toml(text)
    except TomlRefused as refused:
        raise ConfigError([ConfigProblem(name, "", refused.reason, line=refused.line)]) from None
    try:
        config, warnings = parse_config(data, source=name, base_dir=file.resolve().parent, env=env)
    except ConfigError as exc:
        raise ConfigError(_with_lines(exc.problems, name, text)) from None
    problems = list(warnings)
    inline = _inline_secret(data)
    exposed = None if inline is None else _exposed_secret(name, mode, name, inline)
    if exposed is not None:
        problems.append(exposed)
    credentials = None if config.simulator.enabled else load_credentials(config, problems)
    api_keys = load_api_keys(config, problems)
    if config.server.metrics == "api_key" and not api_keys:
        problems.append(
            ConfigProblem(name, "server.metrics", 'is "api_key" but no API key is configured (server.api_keys_file)')
        )
    if not any(p.key == "server.api_keys_file" and p.severity == "error" for p in problems):  # keys were meant
        exposure = exposure_problem(config.server, has_api_keys=bool(api_keys), source=host_source(env, name))
        if exposure is not None:
            problems.append(exposure)
    problems = _with_lines(tuple(problems), name, text)
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return LoadedConfig(config=config, credentials=credentials, warnings=tuple(problems), api_keys=Secret(api_keys))
