"""The built-in IBKR simulator: the server side of IBKR's OAuth 1.0a Web API, for tests and offline runs.

Public API::

    from gateway.simulator import Simulator, SimulatorCredentials, generate_credentials
    creds = generate_credentials()
    sim = Simulator(creds)
    url = await nursery.start(sim.serve, "127.0.0.1", 0)

The simulator shares no code with ``gateway.oauth``: it verifies requests with its own server-side code.
"""

from gateway.simulator.app import stream_pattern
from gateway.simulator.core import WsMessage
from gateway.simulator.credentials import SimulatorCredentials, generate_credentials
from gateway.simulator.faults import Faults
from gateway.simulator.records import Record
from gateway.simulator.server import Simulator

__all__ = [
    "Faults",
    "Record",
    "Simulator",
    "SimulatorCredentials",
    "WsMessage",
    "generate_credentials",
    "stream_pattern",
]
