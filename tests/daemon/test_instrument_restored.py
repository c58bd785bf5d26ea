"""A node whose instrument was power-cycled hears it from the health check: the driver put
the settings back, the node says which (alarm ``instrument_restored``, cleared later);
an instrument whose settings could not be put back is down."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

import qkdnode.node as node_mod
from drivers.interfaces import DetectorStatus, HealthLevel, SinglePhotonDetector
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from qkdnode.config import load_config
from qkdnode.config.sections import InstrumentSection
from qkdnode.hardware import InstrumentSet
from qkdnode.node import Node

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "transmitter.sim.toml"


class _FaultAfterPowerCycle(SpdSimulator):
    def factory_reset(self) -> None:
        super().factory_reset()
        self.state = DetectorStatus.FAULT


def _detector_set(srv: SimServer) -> InstrumentSet:
    section = InstrumentSection(
        driver="ascii_spd", resource=srv.url, timeout_s=0.5, options={"reconnect_timeout_s": 2}
    )
    hw = InstrumentSet({"spd_h": section})
    hw.open_all()
    return hw


def test_power_cycled_detector_raises_instrument_restored_then_clears(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(node_mod, "INSTRUMENT_RESTORED_ALARM_S", 0.5)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    node = Node(load_config(CONFIG), str(CONFIG))
    srv = SimServer(SpdSimulator(), mode="pty", link_path=_link()).start()
    hw = _detector_set(srv)
    try:
        det = hw.one(SinglePhotonDetector)
        det.set_efficiency_pct(20.0)
        det.arm()

        async def go() -> tuple[bool, bool, str, bool]:
            node.note_restored(await asyncio.to_thread(hw.health))
            quiet = not node.alarms.is_active("instrument_restored")
            srv.power_cycle()
            healths = await asyncio.to_thread(hw.health)
            assert healths["spd_h"].level is HealthLevel.DEGRADED
            node.note_restored(healths)
            raised = node.alarms.is_active("instrument_restored")
            cause = next(a.cause for a in node.alarms.active() if a.name == "instrument_restored")
            await asyncio.sleep(0.8)
            return quiet, raised, cause, not node.alarms.is_active("instrument_restored")

        quiet, raised, cause, cleared = asyncio.run(go())
        assert quiet and raised
        assert cause == (
            "settings lost (power cycle?) and restored: "
            "spd_h: efficiency_pct: 10 -> 20, armed: False -> True"
        )
        assert cleared
        assert hw.up["spd_h"] is True
        assert det.status() is DetectorStatus.ARMED and det.efficiency_pct() == 20.0
    finally:
        hw.make_safe()
        hw.close_all()
        srv.stop()


def test_settings_that_cannot_be_put_back_leave_the_instrument_down() -> None:
    srv = SimServer(_FaultAfterPowerCycle(), mode="pty", link_path=_link()).start()
    hw = _detector_set(srv)
    try:
        hw.one(SinglePhotonDetector).arm()
        srv.power_cycle()
        health = hw.health()["spd_h"]
        assert health.level is HealthLevel.FAULT and "STATE FAULT" in health.message
        assert hw.up["spd_h"] is False
    finally:
        hw.close_all()
        srv.stop()


def _link() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="spd"), "tty")
