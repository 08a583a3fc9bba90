"""``python -m gateway doctor``: walk the live path to IBKR one step at a time and say what to fix.

Contract: :func:`diagnose` takes a loaded config and returns a :class:`~gateway.doctor.report.Report` covering
every step of :data:`~gateway.doctor.report.STEPS` (those after a failure are ``not_run``). With
``[simulator] enabled = true`` it starts the built-in simulator and walks against it, as the gateway would. The
offline steps (``config``, ``keys``) read only the config and the key files; the live steps are
:func:`gateway.doctor.live.walk`. Nothing in a report is secret.
"""

from __future__ import annotations

from pathlib import Path

import trio

from gateway.config.load import LoadedConfig
from gateway.config.model import Credentials
from gateway.doctor.live import LiveTarget, walk
from gateway.doctor.offline import KeyMaterial, check_key_material
from gateway.doctor.report import Report, Status, Step, complete
from gateway.oauth.dh import parse_dh_params_pem
from gateway.oauth.keys import load_rsa_private_key
from gateway.upstream.transport import Timeouts, tls_context

__all__ = ["NOTICE", "diagnose", "key_material"]

NOTICE = (
    "the doctor opens its own IBKR session for this user: a gateway running with the same credentials loses its "
    "live session token and re-handshakes; the doctor logs its session out when it is done"
)
DEFAULT_CONID = 265598  # AAPL on NASDAQ, the contract IBKR's own examples use


def key_material(credentials: Credentials, signature_pem: bytes, encryption_pem: bytes, dh_pem: bytes) -> KeyMaterial:
    """What the offline ``keys`` step examines: the loaded ``credentials`` and the three PEM files' contents."""
    identity = credentials.identity
    return KeyMaterial(
        consumer_key=identity.consumer_key,
        access_token=identity.access_token,
        realm=identity.realm,
        signature_key=load_rsa_private_key(signature_pem, what="signature key"),
        encryption_key=load_rsa_private_key(encryption_pem, what="encryption key"),
        dh=parse_dh_params_pem(dh_pem),
        dh_pem=dh_pem,
        prepend_bytes=len(credentials.prepend.reveal()) // 2,
    )


def _read_pems(signature: Path | None, encryption: Path | None, dh: Path | None) -> tuple[bytes, bytes, bytes]:
    """The three key files again (small, and the loader just read them: a blocking read is fine here)."""
    signature_pem, encryption_pem, dh_pem = (path.read_bytes() if path else b"" for path in (signature, encryption, dh))
    return signature_pem, encryption_pem, dh_pem


def _config_step(loaded: LoadedConfig, name: str) -> Step:
    config = loaded.config
    where = "the built-in simulator" if config.simulator.enabled else config.ibkr.base_url
    detail = f"{name} loads; upstream {where}; query rule {config.ibkr.query_rule.value}"
    if loaded.warnings:
        return Step("config", Status.WARN, detail + "; " + "; ".join(str(w) for w in loaded.warnings))
    return Step("config", Status.OK, detail)


async def diagnose(loaded: LoadedConfig, *, config_name: str, conid: int = DEFAULT_CONID) -> Report:
    """The doctor's report for ``loaded`` (see the module contract)."""
    config = loaded.config
    timeouts = Timeouts(
        connect_s=config.upstream.connect_timeout_s,
        read_s=config.upstream.read_timeout_s,
        write_s=config.upstream.write_timeout_s,
        pool_s=config.upstream.pool_timeout_s,
    )
    steps = [_config_step(loaded, config_name)]
    async with trio.open_nursery() as nursery:
        if config.simulator.enabled:
            from gateway.runtime import simulator_credentials
            from gateway.simulator import Simulator, generate_credentials

            simulator = Simulator(generate_credentials(), **config.simulator.simulator_options())
            base_url = await nursery.start(simulator.serve, "127.0.0.1", config.simulator.port)
            creds = simulator.credentials
            credentials = simulator_credentials(creds, config.ibkr.query_rule)
            pems = (creds.signature_key_pem, creds.encryption_key_pem, creds.dh_param_pem)
        else:
            assert loaded.credentials is not None  # the loader provides them whenever the simulator is off
            ibkr = config.ibkr
            base_url, credentials = ibkr.base_url, loaded.credentials
            pems = _read_pems(ibkr.signature_key, ibkr.encryption_key, ibkr.dh_param)
        keys, facts = check_key_material(key_material(credentials, *pems))
        steps.append(keys)
        if keys.status is not Status.FAIL:
            target = LiveTarget(
                base_url=base_url,
                credentials=credentials,
                user_agent=config.ibkr.user_agent,
                compete=config.ibkr.compete,
                timeouts=timeouts,
                tls=tls_context(),
                conid=conid,
            )
            steps.extend(await walk(target))
        nursery.cancel_scope.cancel()
    upstream = f"{base_url} (the built-in simulator, not IBKR)" if config.simulator.enabled else base_url
    return Report(config=config_name, upstream=upstream, steps=complete(steps), notice=NOTICE, facts=facts)
