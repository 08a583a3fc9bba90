"""Reads the TOML file, the environment and the key files, and returns checked configuration and credentials.

This is the shell around :mod:`gateway.config.parse`: it does the file I/O, then loads and cross-checks the key
material (the access-token secret must decrypt with the encryption key). Contract: :func:`load_config` returns a
:class:`LoadedConfig` or raises :class:`~gateway.errors.ConfigError` listing every problem, each naming the file,
the key and, where it can be found, the line. No message contains secret material.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gateway.config.model import Config, Credentials
from gateway.config.parse import parse_config
from gateway.config.schema import api_key
from gateway.errors import ConfigError, ConfigProblem, KeyMaterialError, SecretDecryptError
from gateway.oauth.dh import DHParams, parse_dh_params_pem
from gateway.oauth.keys import decrypt_access_token_secret, load_rsa_private_key
from gateway.oauth.signer import OAuthIdentity
from gateway.redact import Secret

_MAX_KEY_FILE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A checked configuration. ``credentials`` is ``None`` when the simulator is enabled (it makes its own)."""

    config: Config
    credentials: Credentials | None
    warnings: tuple[ConfigProblem, ...]
    api_keys: Secret[tuple[str, ...]] = field(default_factory=lambda: Secret(()))
    """Every client API key (``server.api_keys`` plus the lines of ``server.api_keys_file``); empty = no auth."""


_LINE_POSITION = re.compile(r"at line (\d+)")


def _toml_error(path: str, exc: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(exc)
    match = _LINE_POSITION.search(message)
    line = int(match.group(1)) if match else None
    return ConfigProblem(path, "", f"is not valid TOML: {message}", line=line)


def _locate(text: str, dotted: str) -> int | None:
    """Best-effort line number of ``section.key`` (or ``routes[i].key``) in ``text``, for messages."""
    head, _, key = dotted.partition(".")
    route_index: int | None = None
    if head.startswith("routes[") and head.endswith("]"):
        route_index, head = int(head[7:-1]), "routes"
    section: str | None = None
    routes_seen = -1
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[[") and stripped.rstrip().endswith("]]"):
            section = stripped[2:-2].strip()
            if section == "routes":
                routes_seen += 1
                if route_index == routes_seen and not key:
                    return number
            continue
        if stripped.startswith("["):
            section = stripped[1:].split("]", 1)[0].strip()
            if section == head and not key:
                return number
            continue
        if section != head or (route_index is not None and route_index != routes_seen):
            continue
        if key and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


def _with_lines(problems: tuple[ConfigProblem, ...], path: str, text: str) -> list[ConfigProblem]:
    """Add line numbers to the problems found in ``path`` and order them as they appear in the file."""
    located = []
    for problem in problems:
        if problem.source == path and problem.line is None and problem.key:
            problem = replace(problem, line=_locate(text, problem.key))
        located.append(problem)
    return sorted(located, key=lambda p: (p.source != path, p.line is None, p.line or 0))


def _read_key_file(path: Path, key: str, source: str, problems: list[ConfigProblem]) -> bytes | None:
    """Read one key file, recording a problem if it is missing/unreadable and a warning if it is too open."""
    try:
        info = path.stat()
    except FileNotFoundError:
        problems.append(ConfigProblem(source, key, f"file {path} does not exist"))
        return None
    except OSError as exc:
        problems.append(ConfigProblem(source, key, f"file {path} cannot be examined: {exc.strerror}"))
        return None
    if not stat.S_ISREG(info.st_mode):
        problems.append(ConfigProblem(source, key, f"{path} is not a regular file"))
        return None
    if info.st_size > _MAX_KEY_FILE_BYTES:
        problems.append(ConfigProblem(source, key, f"{path} is too large to be a PEM key file"))
        return None
    if info.st_mode & 0o077:
        problems.append(
            ConfigProblem(
                source,
                key,
                f"{path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}",
                severity="warning",
            )
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append(ConfigProblem(source, key, f"file {path} cannot be read: {exc.strerror}"))
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
        data = _read_key_file(path, f"ibkr.{key}", source, problems)
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
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(name, "", "config file does not exist")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem(name, "", "is a directory, not a config file")]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(name, "", f"cannot be read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(name, "", "is not UTF-8 text")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_error(name, exc)]) from None
    try:
        config, warnings = parse_config(data, source=name, base_dir=file.resolve().parent, env=env)
    except ConfigError as exc:
        raise ConfigError(_with_lines(exc.problems, name, text)) from None
    problems = list(warnings)
    credentials = None if config.simulator.enabled else load_credentials(config, problems)
    api_keys = load_api_keys(config, problems)
    if config.server.metrics == "api_key" and not api_keys:
        problems.append(
            ConfigProblem(name, "server.metrics", 'is "api_key" but no API key is configured (server.api_keys_file)')
        )
    problems = _with_lines(tuple(problems), name, text)
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return LoadedConfig(config=config, credentials=credentials, warnings=tuple(problems), api_keys=Secret(api_keys))
