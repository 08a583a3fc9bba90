"""Command line: ``python -m gateway [run] --config F``, ``check --config F``, ``doctor --config F``, ``init …`` and
``config-docs`` (writes the configuration reference, ``docs/configuration.md``, from the schema).

Contract: :func:`main` takes the argument list and returns the process exit status; it never lets a traceback
reach the user for an expected failure. Exit status 0 = success, 2 = bad configuration or bad arguments
(argparse's own convention), 1 = the gateway stopped on a runtime failure (``doctor``: a step failed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from gateway import __version__
from gateway.errors import ConfigError, ConfigProblem

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

_SUBCOMMANDS = ("run", "check", "doctor", "init", "config-docs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="IBKR Web API gateway: holds the OAuth session, serves IBKR as a plain local API.",
    )
    parser.add_argument("--version", action="version", version=f"ibkr-oauth-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{run,check,doctor,init,config-docs}")

    run = commands.add_parser("run", help="run the gateway (the default command)")
    run.add_argument("--config", required=True, help="path to the TOML config, e.g. gateway.toml")

    check = commands.add_parser("check", help="validate a config and its key files, then exit")
    check.add_argument("--config", required=True, help="path to the TOML config")

    doctor = commands.add_parser(
        "doctor", help="walk the live path to IBKR step by step and say what to fix (opens its own IBKR session)"
    )
    doctor.add_argument("--config", required=True, help="path to the TOML config")
    doctor.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    doctor.add_argument(
        "--conid", type=int, default=265598, help="contract for the market-data snapshot (default 265598, AAPL)"
    )

    init = commands.add_parser("init", help="check IBKR credentials and write a complete config")
    init.add_argument("--keys-dir", required=True, help="folder with the PEM files IBKR's set-up produced")
    init.add_argument("--consumer-key", required=True)
    init.add_argument("--access-token", required=True)
    init.add_argument(
        "--access-token-secret",
        help="base64 secret as IBKR issued it, written into --output (default: checked from "
        "$GATEWAY__IBKR__ACCESS_TOKEN_SECRET and left out of the file)",
    )
    init.add_argument("--output", required=True, help="config file to write, e.g. gateway.prod.toml")
    init.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    init.add_argument("--signature-key", default="private_signature.pem", help="file name in --keys-dir")
    init.add_argument("--encryption-key", default="private_encryption.pem", help="file name in --keys-dir")
    init.add_argument("--dh-param", default="dhparam.pem", help="file name in --keys-dir")
    init.add_argument("--realm", default=None, help="default: test_realm for TESTCONS, else limited_poa")
    init.add_argument("--base-url", default="https://api.ibkr.com")

    docs = commands.add_parser("config-docs", help="print the configuration reference (Markdown) made from the schema")
    docs.add_argument("--output", help="write it to this file instead, e.g. docs/configuration.md")
    return parser


def _print_problems(problems: Sequence[ConfigProblem]) -> None:
    """One line per problem on stderr; errors are prefixed ``error:``, warnings carry their own prefix."""
    for problem in problems:
        print(f"error: {problem}" if problem.severity == "error" else str(problem), file=sys.stderr)


def _cmd_check(config_path: str) -> int:
    from gateway.config import load_config

    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_CONFIG
    _print_problems(loaded.warnings)
    config = loaded.config
    target = "the built-in simulator" if config.simulator.enabled else config.ibkr.base_url
    print(
        f"{config_path}: ok — listens on {config.server.host}:{config.server.port}, upstream {target}, "
        f"{len(config.routes)} route(s)"
    )
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    import trio

    from gateway.config import load_config
    from gateway.doctor import NOTICE, diagnose
    from gateway.doctor.report import exit_status, render_json, render_text

    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        if args.json:
            problems = [str(problem) for problem in exc.problems]
            print(json.dumps({"ok": False, "config": args.config, "failed": "config", "problems": problems}, indent=2))
        else:
            _print_problems(exc.problems)
        return EXIT_CONFIG
    if not args.json:
        print(f"note: {NOTICE}", file=sys.stderr)
    report = trio.run(partial(diagnose, loaded, config_name=args.config, conid=args.conid))
    if args.json:
        sys.stdout.write(render_json(report))
    else:
        sys.stdout.write(render_text(replace(report, notice="")))
    return exit_status(report)


def _cmd_init(args: argparse.Namespace) -> int:
    """Write a config; a secret from the environment is checked but left out of the file (see :mod:`gateway.init`)."""
    from gateway.init import SECRET_VARIABLE, InitRequest, write_config

    in_file = bool(args.access_token_secret)
    secret = args.access_token_secret or os.environ.get(SECRET_VARIABLE)
    if not secret:
        print(f"error: init: give --access-token-secret or set {SECRET_VARIABLE}", file=sys.stderr)
        return EXIT_CONFIG
    request = InitRequest(
        keys_dir=Path(args.keys_dir),
        output=Path(args.output),
        consumer_key=args.consumer_key,
        access_token=args.access_token,
        access_token_secret=secret,
        signature_key=args.signature_key,
        encryption_key=args.encryption_key,
        dh_param=args.dh_param,
        realm=args.realm,
        base_url=args.base_url,
        force=args.force,
        secret_in_file=in_file,
    )
    try:
        warnings = write_config(request)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_CONFIG
    _print_problems(warnings)
    if in_file:
        where = (
            "the access-token secret from --access-token-secret is written in it: keep the file private, or delete "
            f"that line and set {SECRET_VARIABLE} instead"
        )
    else:
        where = f"the access-token secret is not in it: `check` and `run` read it from {SECRET_VARIABLE}, keep that set"
    print(f"wrote {args.output} (mode 0600); {where}")
    print(f"check it with: python -m gateway check --config {args.output}")
    return EXIT_OK


def _cmd_config_docs(output: str | None) -> int:
    from gateway.config.reference import render_reference

    text = render_reference()
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
        print(f"wrote {output}")
    return EXIT_OK


def _cmd_run(config_path: str) -> int:
    from gateway.config import load_config

    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_CONFIG
    _print_problems(loaded.warnings)
    from gateway.runtime import run_gateway  # imported late: bad configs exit before the server stack loads

    return run_gateway(loaded)


def main(argv: Sequence[str]) -> int:
    """Run the command line with ``argv`` (without the program name) and return the exit status."""
    args_list = list(argv)
    if not args_list or (args_list[0] not in _SUBCOMMANDS and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "run")
    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse reports its own error (one line plus usage)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_CONFIG
    if args.command == "check":
        return _cmd_check(args.config)
    if args.command == "init":
        return _cmd_init(args)
    if args.command == "doctor":
        return _cmd_doctor(args)
    if args.command == "config-docs":
        return _cmd_config_docs(args.output)
    return _cmd_run(args.config)


def console_main() -> None:
    """Entry point of the ``ibkr-gateway`` console script and ``python -m gateway``."""
    try:
        status = main(sys.argv[1:])
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
