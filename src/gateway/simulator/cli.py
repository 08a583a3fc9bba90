"""Command line of the simulator: serve on host:port until Ctrl-C, optionally writing the client credentials
and a ``gateway.toml`` that points the gateway at it.

Bad command-line input prints one ``gateway.simulator: error: ...`` line and exits 2; a runtime failure (port
in use, unwritable directory) prints one line and exits 1; SIGINT/SIGTERM end a clean run with exit 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import trio

from gateway.simulator.credentials import generate_credentials
from gateway.simulator.server import Simulator

PROG = "gateway.simulator"
_CONSUMER_KEY = re.compile(r"[A-Z0-9]{1,32}")


class _UsageError(Exception):
    pass


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Fatal(Exception):
    """A runtime failure worth one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def _consumer_key(text: str) -> str:
    if _CONSUMER_KEY.fullmatch(text) is None:
        raise argparse.ArgumentTypeError("consumer key must be 1-32 upper-case letters or digits")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (errors raise instead of exiting; :func:`main` turns them into exit 2)."""
    parser = _Parser(prog=f"python -m {PROG}", description="Run the built-in IBKR Web API simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=5100, help="port to listen on, 0 = any (default 5100)")
    parser.add_argument(
        "--write-credentials",
        metavar="DIR",
        type=Path,
        help="write private_signature.pem, private_encryption.pem, dhparam.pem and gateway.toml (mode 0600)",
    )
    parser.add_argument("--gateway-port", type=_port, default=5000, help="[server] port written to gateway.toml")
    parser.add_argument("--consumer-key", type=_consumer_key, help="fixed consumer key (TESTCONS => test_realm)")
    parser.add_argument("--lst-ttl-s", type=_positive, default=86400.0, help="live session token lifetime")
    parser.add_argument("--lenient", action="store_true", help="also accept unsigned or in-URL query strings")
    parser.add_argument("--heartbeat-s", type=_positive, default=10.0, help="WebSocket heartbeat interval")
    parser.add_argument("--tick-interval-s", type=_positive, default=1.0, help="market-data tick interval")
    parser.add_argument("--subscription-ttl-s", type=_positive, default=900.0, help="market-data subscription TTL")
    parser.add_argument(
        "--ws-idle-close-s",
        type=float,
        default=60.0,
        help="close a WebSocket whose client sent nothing this long, as IBKR does (0 = never)",
    )
    on = argparse.BooleanOptionalAction  # IBKR's rules are on unless switched off (--no-...)
    parser.add_argument(
        "--accounts-first", action=on, default=True, help="refuse snapshot/order calls until /iserver/accounts was read"
    )
    parser.add_argument(
        "--snapshot-preflight", action=on, default=True, help="answer a conid's first snapshot without price fields"
    )
    parser.add_argument("--pacing", action=on, default=True, help="enforce IBKR's request limits (429, penalty box)")
    parser.add_argument("--penalty-box-s", type=_non_negative, default=600.0, help="penalty box after a 429")
    parser.add_argument("--ws-binary", action="store_true", help="send WebSocket JSON in binary frames")
    parser.add_argument("--seed", type=int, help="seed for the market-data random walk")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    return parser


async def _watch_signals(cancel: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            logging.getLogger("gateway.simulator").info("signal %d: stopping", signum)
            cancel.cancel()
            return


async def _run(args: argparse.Namespace) -> None:
    creds = generate_credentials(consumer_key=args.consumer_key)
    sim = Simulator(
        creds,
        lenient=args.lenient,
        lst_ttl_s=args.lst_ttl_s,
        heartbeat_s=args.heartbeat_s,
        tick_interval_s=args.tick_interval_s,
        subscription_ttl_s=args.subscription_ttl_s,
        accounts_first=args.accounts_first,
        snapshot_preflight=args.snapshot_preflight,
        pacing=args.pacing,
        penalty_box_s=args.penalty_box_s,
        seed=args.seed,
        ws_binary=args.ws_binary,
        ws_idle_close_s=args.ws_idle_close_s if args.ws_idle_close_s > 0 else None,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, nursery.cancel_scope)
        try:
            url = await nursery.start(sim.serve, args.host, args.port)
        except* OSError as group:
            first = _first(group)
            detail = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
            raise _Fatal(f"cannot listen on {args.host}:{args.port}: {detail}") from None
        if args.write_credentials is not None:
            try:
                toml_path = sim.write_credentials(args.write_credentials, gateway_port=args.gateway_port)
            except OSError as exc:
                raise _Fatal(f"cannot write credentials to {args.write_credentials}: {exc.strerror or exc}") from None
            print(f"credentials written: {toml_path}", flush=True)
        print(f"simulator listening on {url} (Ctrl-C to stop)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator CLI; returns the process exit status."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except _Exit as exc:
        return exc.status
    if not args.host.strip():
        print(f"{PROG}: error: --host must not be empty", file=sys.stderr)
        return 2
    if args.write_credentials is not None and args.write_credentials.exists() and not args.write_credentials.is_dir():
        print(f"{PROG}: error: --write-credentials {args.write_credentials} is not a directory", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        trio.run(_run, args)
    except KeyboardInterrupt:  # Ctrl-C before the signal watcher was installed
        return 0
    except BaseExceptionGroup as group:
        fatal, rest = group.split(_Fatal)
        if rest is not None and rest.split(KeyboardInterrupt)[1] is not None:
            raise
        if fatal is not None:
            print(f"{PROG}: error: {_first(fatal)}", file=sys.stderr)
            return 1
        return 0
    except _Fatal as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
