"""Whether the listen address is reachable beyond this machine, and whether that is allowed without API keys (pure).

Whoever reaches the gateway holds the brokerage session, so a listen address other than loopback with no API key
is refused unless ``server.allow_network_without_api_keys`` opts in (then it is a warning on every start) — as
Jupyter refuses to listen publicly without a token.

Contract: loopback is ``localhost`` (any case), an IPv4 address in ``127.0.0.0/8`` (also IPv4-mapped, as
``::ffff:127.0.0.1``) and ``::1``; everything else — ``0.0.0.0``, ``::``, any other address, any other host name —
is the network. :func:`exposure_problem` returns the error, the warning, or ``None``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from gateway.config import schema
from gateway.config.model import ServerConfig
from gateway.errors import ConfigProblem

OPT_IN_KEY = "allow_network_without_api_keys"


def is_loopback_host(host: str) -> bool:
    """True when ``host`` is only reachable from this machine (see the module contract)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 is 127.0.0.1
    return address.is_loopback


def host_source(env: Mapping[str, str], config_source: str) -> str:
    """Where ``server.host`` came from: the ``GATEWAY__SERVER__HOST`` variable when set, else the config file."""
    for name in env:
        if name.startswith(schema.ENV_PREFIX) and name[len(schema.ENV_PREFIX) :].lower() == "server__host":
            return name
    return config_source


def exposure_problem(server: ServerConfig, *, has_api_keys: bool, source: str) -> ConfigProblem | None:
    """The problem with listening on ``server.host`` given whether any API key is configured, or ``None``.

    ``source`` names where the host was set (see :func:`host_source`).
    """
    if has_api_keys or is_loopback_host(server.host):
        return None
    if server.allow_network_without_api_keys:
        return ConfigProblem(
            source,
            "server.host",
            f"{server.host!r} is reachable from the network and no API key is configured "
            f"(server.{OPT_IN_KEY} = true): anyone who can reach the port can use the brokerage session",
            severity="warning",
        )
    return ConfigProblem(
        source,
        "server.host",
        f"{server.host!r} is reachable from the network but no API key is configured, so anyone who can reach the "
        "port could use the brokerage session; configure API keys (server.api_keys_file or "
        f"GATEWAY__SERVER__API_KEYS), listen on 127.0.0.1, or opt in with server.{OPT_IN_KEY} = true",
    )
