"""pytest plugin (entry point ``pytest11``): fixtures that give a test a running gateway and simulator.

Fixtures (need pytest-trio; with ``trio_mode = true`` or ``@pytest.mark.trio`` on the test):

- ``ibkr_sim_credentials`` (session scope): one throwaway IBKR-shaped credential set, reused to save RSA time.
- ``ibkr_gateway``: a :class:`gateway.testing.TestGateway` with a ready session, drained after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.simulator import SimulatorCredentials, generate_credentials
from gateway.testing import TestGateway, open_test_gateway


@pytest.fixture(scope="session")
def ibkr_sim_credentials() -> SimulatorCredentials:
    """One set of simulator credentials for the whole test session."""
    return generate_credentials()


@pytest.fixture
async def ibkr_gateway(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    """A gateway in front of the built-in simulator, session ready; drained (logout) after the test."""
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gateway:
        yield gateway
