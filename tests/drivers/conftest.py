from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator


@pytest.fixture(params=["tcp", "pty"])
def itla_server(request: pytest.FixtureRequest) -> Iterator[SimServer]:
    link = os.path.join(tempfile.mkdtemp(prefix="itla"), "ttyITLA")
    with SimServer(ItlaSimulator(tune_time_s=0.1), mode=request.param, link_path=link) as srv:
        yield srv


@pytest.fixture(params=["tcp", "pty"])
def spd_server(request: pytest.FixtureRequest) -> Iterator[SimServer]:
    link = os.path.join(tempfile.mkdtemp(prefix="spd"), "ttySPD")
    with SimServer(SpdSimulator(), mode=request.param, link_path=link) as srv:
        yield srv
