"""Interface contract over every driver/simulator pair."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from drivers.ascii_spd import AsciiSpd
from drivers.errors import InstrumentError, OutOfRangeError
from drivers.interfaces import (
    TAG_DTYPE,
    BB84State,
    DetectorStatus,
    Encoder,
    HealthLevel,
    Instrument,
    IntensityClass,
    IntensityModulator,
    Laser,
    LaserStatus,
    OpticalPowerMeter,
    PolarizationController,
    SinglePhotonDetector,
    TagBlock,
    TimeTagger,
    VariableAttenuator,
)
from drivers.keysight_816x import Keysight816xLaser, Keysight816xOptions
from drivers.keysight_8157x import Keysight8157xAttenuator, Keysight8157xOptions
from drivers.keysight_33500 import (
    Awg33500Options,
    Keysight33500Encoder,
    Keysight33500IntensityModulator,
)
from drivers.oif_itla import OifItlaLaser, OifItlaOptions
from drivers.ozoptics_epc import OzOpticsEpc, OzOpticsEpcOptions
from drivers.scpisim import ScpiModelTransport
from drivers.scpisim.keysight_816x import Keysight816xModel
from drivers.serialsim.epc_sim import EpcSimulator
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from drivers.thorlabs_pm100 import ThorlabsPM100, ThorlabsPM100Options
from drivers.timetag_file import TagFileReplayTagger, TagFileWriter
from tests.drivers.helpers import sim_copy

Factory = Callable[[Path], tuple[Instrument, Callable[[], int]]]


def _no_count() -> int:
    return -1


def _visa(cls: type, options_cls: type, yaml: str, resource: str) -> Factory:
    def make(tmp: Path) -> tuple[Instrument, Callable[[], int]]:
        opts = options_cls(visa_library=sim_copy(tmp, yaml), reconnect_timeout_s=1.0)
        return cls("dut", resource, 1.0, opts), _no_count

    return make


def _serial(cls: type, options_cls: type, handler: Callable[[], object], mode: str) -> Factory:
    def make(tmp: Path) -> tuple[Instrument, Callable[[], int]]:
        link = os.path.join(tempfile.mkdtemp(dir=tmp), "tty")
        srv = SimServer(handler(), mode=mode, link_path=link).start()  # type: ignore[arg-type]
        _servers.append(srv)
        return cls(
            "dut", srv.url, 0.5, options_cls(reconnect_timeout_s=1.0)
        ), lambda: srv.requests_seen

    return make


def _816x_model(tmp: Path) -> tuple[Instrument, Callable[[], int]]:
    model = Keysight816xModel(settle_time_s=0.05)
    return Keysight816xLaser("dut", "unused", transport=ScpiModelTransport("dut", model)), _no_count


def _tagfile(tmp: Path) -> tuple[Instrument, Callable[[], int]]:
    path = tmp / "rec.qkdtags"
    with TagFileWriter(path, [1, 2]) as w:
        for k in range(3):
            tags = np.zeros(4, dtype=TAG_DTYPE)
            tags["channel"] = [1, 2, 1, 2]
            tags["time_ps"] = k * 1000 + np.arange(4) * 100
            w.write_block(TagBlock(tags, start_ps=k * 1000, stop_ps=(k + 1) * 1000))
    return TagFileReplayTagger("dut", str(path)), _no_count


_servers: list[SimServer] = []

PAIRS: dict[str, Factory] = {
    "keysight_816x": _visa(
        Keysight816xLaser, Keysight816xOptions, "keysight_816x.yaml", "GPIB0::20::INSTR"
    ),
    "keysight_816x_model": _816x_model,
    "keysight_8157x": _visa(
        Keysight8157xAttenuator, Keysight8157xOptions, "keysight_8157x.yaml", "GPIB0::21::INSTR"
    ),
    "thorlabs_pm100": _visa(
        ThorlabsPM100,
        ThorlabsPM100Options,
        "thorlabs_pm100.yaml",
        "USB0::0x1313::0x8078::P0000001::INSTR",
    ),
    "keysight_33500_im": _visa(
        Keysight33500IntensityModulator,
        Awg33500Options,
        "keysight_33500.yaml",
        "USB0::0x0957::0x2C07::MY00000003::INSTR",
    ),
    "keysight_33500_encoder": _visa(
        Keysight33500Encoder,
        Awg33500Options,
        "keysight_33500.yaml",
        "USB0::0x0957::0x2C07::MY00000004::INSTR",
    ),
    "oif_itla_tcp": _serial(
        OifItlaLaser, OifItlaOptions, lambda: ItlaSimulator(tune_time_s=0.05), "tcp"
    ),
    "oif_itla_pty": _serial(
        OifItlaLaser, OifItlaOptions, lambda: ItlaSimulator(tune_time_s=0.05), "pty"
    ),
    "ascii_spd_tcp": _serial(AsciiSpd, type(AsciiSpd.Options()), SpdSimulator, "tcp"),
    "ascii_spd_pty": _serial(AsciiSpd, type(AsciiSpd.Options()), SpdSimulator, "pty"),
    "ozoptics_epc_tcp": _serial(OzOpticsEpc, OzOpticsEpcOptions, EpcSimulator, "tcp"),
    "ozoptics_epc_pty": _serial(OzOpticsEpc, OzOpticsEpcOptions, EpcSimulator, "pty"),
    "timetag_file": _tagfile,
}


@pytest.fixture(params=sorted(PAIRS))
def dut(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Instrument, Callable[[], int]]]:
    inst, count = PAIRS[request.param](tmp_path)
    inst.connect()
    yield inst, count
    inst.close()
    while _servers:
        _servers.pop().stop()


def _assert_refused_before_sending(count: Callable[[], int], fn: Callable[[], object]) -> None:
    before = count()
    with pytest.raises(OutOfRangeError) as info:
        fn()
    assert info.value.instrument == "dut" and info.value.command and info.value.reason
    assert count() == before  # nothing reached the instrument (-1 == -1 where not countable)


def _check_limits(limits: tuple[float, float]) -> None:
    lo, hi = limits
    assert isinstance(lo, float) and isinstance(hi, float) and lo < hi


def test_life_cycle_and_health(dut: tuple[Instrument, Callable[[], int]]) -> None:
    inst, _ = dut
    inst.connect()  # idempotent
    ident = inst.identify()
    assert isinstance(ident, str) and ident
    h = inst.health()
    assert h.level is HealthLevel.OK, h
    inst.safe_state()
    inst.safe_state()  # already safe: must not raise
    inst.close()
    inst.close()
    h = inst.health()  # never raises, reports the fault
    assert h.level is HealthLevel.FAULT and "dut" in h.message
    with pytest.raises(InstrumentError):
        inst.identify()


def test_class_contract(dut: tuple[Instrument, Callable[[], int]]) -> None:
    inst, count = dut
    if isinstance(inst, Laser):
        _check_limits(inst.power_range_dbm)
        _check_limits(inst.wavelength_range_nm)
        p = (inst.power_range_dbm[0] + min(inst.power_range_dbm[1], 10.0)) / 2
        inst.set_power_dbm(p)
        assert inst.power_dbm() == pytest.approx(p, abs=0.01)
        wl = sum(inst.wavelength_range_nm) / 2
        inst.set_wavelength_nm(wl)
        assert inst.wavelength_nm() == pytest.approx(wl, abs=0.01)
        assert isinstance(inst.temperature_c(), float)
        inst.set_emission(True)
        assert inst.emission_on() is True
        assert inst.status() in (LaserStatus.WARMING_UP, LaserStatus.LOCKED)
        _assert_refused_before_sending(
            count, lambda: inst.set_power_dbm(inst.power_range_dbm[1] + 1)
        )
        _assert_refused_before_sending(
            count, lambda: inst.set_wavelength_nm(inst.wavelength_range_nm[0] - 1)
        )
        _assert_refused_before_sending(count, lambda: inst.set_power_dbm(math.nan))
        inst.safe_state()
        assert inst.emission_on() is False and inst.status() is LaserStatus.OFF
    elif isinstance(inst, IntensityModulator | Encoder):
        _check_limits(inst.drive_range_v)
        _check_limits(inst.bias_range_v)
        classes = list(IntensityClass) if isinstance(inst, IntensityModulator) else list(BB84State)
        for k, c in enumerate(classes):
            v = 0.5 * k - 0.3
            if isinstance(inst, IntensityModulator):
                inst.set_level_v(c, v)  # type: ignore[arg-type]
            else:
                inst.set_drive_v(c, v)  # type: ignore[arg-type]
        for k, c in enumerate(classes):
            got = inst.level_v(c) if isinstance(inst, IntensityModulator) else inst.drive_v(c)  # type: ignore[arg-type]
            assert got == pytest.approx(0.5 * k - 0.3, abs=1e-4)
        inst.set_bias_v(1.25)
        assert inst.bias_v() == pytest.approx(1.25)
        _assert_refused_before_sending(count, lambda: inst.set_bias_v(inst.bias_range_v[1] + 0.1))
        inst.set_output(True)
        assert inst.output_on() is True
        inst.safe_state()
        assert inst.output_on() is False
    elif isinstance(inst, VariableAttenuator):
        _check_limits(inst.attenuation_range_db)
        inst.set_attenuation_db(23.5)
        assert inst.attenuation_db() == pytest.approx(23.5)
        _assert_refused_before_sending(count, lambda: inst.set_attenuation_db(-1))
        inst.set_shutter(True)
        assert inst.shutter_open() is True
        inst.safe_state()
        assert inst.shutter_open() is False
    elif isinstance(inst, OpticalPowerMeter):
        inst.set_wavelength_nm(1310)
        p = inst.power_w()
        assert isinstance(p, float) and 0 < p < 1e-3  # W: the sim reads 1-2 uW
        _assert_refused_before_sending(count, lambda: inst.set_wavelength_nm(5000))
    elif isinstance(inst, SinglePhotonDetector):
        for rng in (inst.dead_time_range_ns, inst.delay_range_ps):
            _check_limits(rng)
        inst.set_efficiency_pct(20)
        assert inst.efficiency_pct() == pytest.approx(20)
        inst.set_dead_time_ns(5000)
        assert inst.dead_time_ns() == pytest.approx(5000)
        inst.set_delay_ps(1234.5)
        assert inst.delay_ps() == pytest.approx(1234.5)
        inst.set_threshold_v(0.75)
        assert inst.threshold_v() == pytest.approx(0.75)
        _assert_refused_before_sending(
            count, lambda: inst.set_dead_time_ns(inst.dead_time_range_ns[1] * 2)
        )
        assert inst.status() is DetectorStatus.DISARMED
        assert inst.count_rate_hz() == 0.0
        inst.arm()
        assert inst.status() is DetectorStatus.ARMED
        assert inst.count_rate_hz() > 0
        inst.safe_state()
        assert inst.status() is DetectorStatus.DISARMED
    elif isinstance(inst, TimeTagger):
        assert inst.channels() == [1, 2]
        inst.set_input_delay_ps(2, 50)
        assert inst.input_delay_ps(2) == 50
        inst.set_trigger_level_v(1, 0.2)
        assert inst.trigger_level_v(1) == pytest.approx(0.2)
        inst.start_stream()
        block = inst.read_block(0.5)
        assert block is not None and block.tags.dtype == TAG_DTYPE and len(block) == 4
        assert list(block.tags["time_ps"]) == [0, 150, 200, 350]  # ch2 tags delayed by 50 ps
        rates = inst.count_rates_hz()
        assert set(rates) == {1, 2} and rates[1] == pytest.approx(2 / 1e-9)
        inst.safe_state()
        assert inst.read_block(0.01) is None
    elif isinstance(inst, PolarizationController):
        _check_limits(inst.retardance_range_rad)
        n = len(inst.axes_deg)
        lo, hi = inst.retardance_range_rad
        wanted = tuple(lo + (hi - lo) * (k + 1) / (n + 1) for k in range(n))
        inst.set_retardances_rad(wanted)
        assert inst.retardances_rad() == pytest.approx(wanted, abs=0.01)
        _assert_refused_before_sending(count, lambda: inst.set_retardances_rad((hi + 0.1,) * n))
        _assert_refused_before_sending(count, lambda: inst.set_retardances_rad((0.0,) * (n + 1)))
        inst.safe_state()  # nothing to make safe: the compensation stays
        assert inst.retardances_rad() == pytest.approx(wanted, abs=0.01)
    else:  # pragma: no cover
        pytest.fail(f"no contract for {type(inst)}")
