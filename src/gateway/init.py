"""``python -m gateway init``: check IBKR credentials as handed out and write a complete, commented config.

Contract: :func:`write_config` writes the file only when every check passes (the PEM files parse, the
access-token secret decrypts with the encryption key to IBKR's 32-byte prepend, the values are valid), never
overwrites an existing file unless ``force`` is set, creates it with mode 0600, and otherwise raises
:class:`~gateway.errors.ConfigError` listing every problem. A secret given on the command line is written into
the file; one taken from :data:`SECRET_VARIABLE` never is: the key is left out with a comment naming the
variable, and the file is checked the way ``check`` and ``run`` will read it, with that variable set.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.config.load import load_credentials
from gateway.config.parse import parse_config
from gateway.config.render import render_config
from gateway.config.schema import ENV_PREFIX
from gateway.errors import ConfigError, ConfigProblem

SECRET_VARIABLE = f"{ENV_PREFIX}IBKR__ACCESS_TOKEN_SECRET"
"""The environment variable ``check`` and ``run`` read the access-token secret from when the file has none."""

_HEADER = "ibkr-oauth-gateway configuration written by `python -m gateway init`.\n"
_HEADER_WITH_SECRET = _HEADER + (
    "It holds the access-token secret: keep it mode 0600, or move the secret to the environment\n"
    f"variable {SECRET_VARIABLE} and delete the line."
)
_HEADER_WITHOUT_SECRET = _HEADER + (
    "It holds no access-token secret: `check` and `run` read it from the environment variable\n"
    f"{SECRET_VARIABLE}, which must be set for them."
)


@dataclass(frozen=True, slots=True)
class InitRequest:
    """What ``init`` was asked for. File names are relative to ``keys_dir``; ``realm=None`` means auto."""

    keys_dir: Path
    output: Path
    consumer_key: str
    access_token: str
    access_token_secret: str
    signature_key: str = "private_signature.pem"
    encryption_key: str = "private_encryption.pem"
    dh_param: str = "dhparam.pem"
    realm: str | None = None
    base_url: str = "https://api.ibkr.com"
    force: bool = False
    secret_in_file: bool = True
    """``False`` when the secret came from :data:`SECRET_VARIABLE`: it is checked, never written."""

    def __repr__(self) -> str:
        return f"InitRequest(keys_dir={self.keys_dir!s}, output={self.output!s}, consumer_key={self.consumer_key})"


def _relative(target: Path, start: Path) -> str:
    """``target`` relative to ``start`` when possible (so the config can move with its keys), else absolute."""
    try:
        return os.path.relpath(target.resolve(), start.resolve())
    except ValueError:  # different drives on Windows
        return str(target.resolve())


def write_config(request: InitRequest) -> list[ConfigProblem]:
    """Check the credentials and write the config; returns warnings. See the module contract."""
    output = request.output
    source = str(output)
    if output.exists() and not request.force:
        raise ConfigError([ConfigProblem(source, "", "already exists; pass --force to overwrite it")])
    if not request.keys_dir.is_dir():
        raise ConfigError([ConfigProblem(str(request.keys_dir), "", "--keys-dir is not a folder")])
    out_dir = output.resolve().parent
    realm = request.realm or ("test_realm" if request.consumer_key == "TESTCONS" else "limited_poa")
    ibkr: dict[str, object] = {
        "base_url": request.base_url,
        "consumer_key": request.consumer_key,
        "access_token": request.access_token,
        "signature_key": _relative(request.keys_dir / request.signature_key, out_dir),
        "encryption_key": _relative(request.keys_dir / request.encryption_key, out_dir),
        "dh_param": _relative(request.keys_dir / request.dh_param, out_dir),
        "realm": realm,
    }
    if request.secret_in_file:
        ibkr["access_token_secret"] = "".join(request.access_token_secret.split())
        text = render_config({"ibkr": ibkr}, header=_HEADER_WITH_SECRET)
        env: dict[str, str] = {}
    else:
        note = f"not written here by `init`: it is read from the environment variable {SECRET_VARIABLE}"
        text = render_config({"ibkr": ibkr}, header=_HEADER_WITHOUT_SECRET, notes={"ibkr.access_token_secret": note})
        env = {SECRET_VARIABLE: request.access_token_secret}
    # Check exactly what will be written, the way `run` will read it (no other environment override).
    config, problems = parse_config(tomllib.loads(text), source=source, base_dir=out_dir, env=env)
    if load_credentials(config, problems) is None or any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if request.force else os.O_EXCL)
    try:
        fd = os.open(output, flags, 0o600)
    except FileExistsError:
        raise ConfigError([ConfigProblem(source, "", "already exists; pass --force to overwrite it")]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(source, "", f"cannot be written: {exc.strerror}")]) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    return [p for p in problems if p.severity == "warning" and p.key != "routes"]
