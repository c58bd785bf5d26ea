"""The Aurea gated InGaAs detector driver against a stand-in shaped like Aurea's
``SPD_OEM`` wrapper. One test per fact of the wrapper and Aurea's example application
(codes, units, return conventions), then the detector physics, the failures a vendor
library shows, power cycles, and the CLI."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from drivers import registry
from drivers.aurea_spd import AureaSpd, AureaSpdOptions
from drivers.errors import (
    DriverConfigError,
    DriverUnavailableError,
    InstrumentChangedError,
    InstrumentError,
    InstrumentReportedError,
    NotConnectedError,
    NotSupportedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.interfaces import DetectorMode, DetectorStatus, HealthLevel
from qkdnode.cli import main
from tests.drivers import aurea_standin
from tests.drivers.aurea_standin import SimDevice

FAST = AureaSpdOptions(reopen_gap_s=0.0)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> SimDevice:
    dev = SimDevice()
    monkeypatch.setattr(aurea_standin, "DEVICE", dev)
    monkeypatch.setitem(sys.modules, "SPD_OEM", aurea_standin)
    return dev


@pytest.fixture
def spd(device: SimDevice) -> Iterator[AureaSpd]:
    d = AureaSpd("spd0", "", 1.0, FAST)
    d.connect()
    yield d
    d.close()


# --- the wrapper's facts ---------------------------------------------------------------


def test_life_cycle_and_health(device: SimDevice, spd: AureaSpd) -> None:
    spd.connect()  # idempotent: no second open
    assert device.calls.count("openDevice") == 1
    assert spd.health().level is HealthLevel.OK
    spd.safe_state()
    spd.safe_state()  # already safe: must not raise
    spd.close()
    spd.close()
    assert not device.is_open
    health = spd.health()  # never raises, reports the fault
    assert health.level is HealthLevel.FAULT and "spd0" in health.message
    with pytest.raises(NotConnectedError):
        spd.identify()
    spd.safe_state()  # not connected: nothing to do, no error


def test_connect_reads_the_offered_efficiencies_and_dead_time_bounds(
    device: SimDevice, spd: AureaSpd
) -> None:
    # getEfficiencyRange: the values available in %; getDeadtimeRange: min and max in us
    assert spd.efficiencies_pct == (10, 20, 25, 30)
    assert spd.dead_time_range_ns == (100.0, 100_000.0)
    assert spd.identify() == "Aurea Technology,SPD_OEM_A/0042/v1.3"
    assert device.is_open and spd.health().level is HealthLevel.OK


def test_detection_mode_codes_are_0_continuous_and_1_gated(
    device: SimDevice, spd: AureaSpd
) -> None:
    spd.set_mode(DetectorMode.FREE_RUNNING)
    assert device.mode == 0 and spd.mode() is DetectorMode.FREE_RUNNING
    spd.set_mode(DetectorMode.GATED)
    assert device.mode == 1 and spd.mode() is DetectorMode.GATED
    device.mode = 7
    with pytest.raises(ProtocolError, match="unknown mode"):
        spd.mode()


def test_dead_time_is_sent_in_microseconds(device: SimDevice, spd: AureaSpd) -> None:
    spd.set_dead_time_ns(12_500)
    assert device.dead_time_us == 12.5 and spd.dead_time_ns() == 12_500


def test_efficiency_is_an_integer_percent_from_the_offered_set(
    device: SimDevice, spd: AureaSpd
) -> None:
    spd.set_efficiency_pct(25)
    assert device.efficiency_pct == 25 and spd.efficiency_pct() == 25


def test_output_state_1_is_on_as_aureas_example_has_it(device: SimDevice, spd: AureaSpd) -> None:
    assert spd.status() is DetectorStatus.DISARMED
    spd.arm()
    assert device.output == 1 and spd.status() is DetectorStatus.ARMED
    spd.safe_state()
    assert device.output == 0 and spd.status() is DetectorStatus.DISARMED
    spd.arm()
    spd.reset_latch()  # no latch: disarms
    assert device.output == 0


def test_a_site_can_invert_the_unconfirmed_output_code(device: SimDevice) -> None:
    d = AureaSpd("spd0", "", 1.0, AureaSpdOptions(reopen_gap_s=0.0, output_on_code=0))
    d.connect()
    d.arm()
    assert device.output == 0 and d.status() is DetectorStatus.ARMED
    d.disarm()
    assert device.output == 1 and d.status() is DetectorStatus.DISARMED
    d.close()


def test_clock_and_detections_are_ctypes_numbers_in_hz(device: SimDevice, spd: AureaSpd) -> None:
    device.clock_hz = 1.25e6
    device.photons_per_gate = 0.1
    spd.arm()
    assert spd.gate_frequency_hz() == 1.25e6
    assert spd.count_rate_hz() == round(device.detections_hz()) > 0


def test_body_temperature_is_celsius_reported_in_kelvin(device: SimDevice, spd: AureaSpd) -> None:
    device.body_temp_c = 31.5
    assert spd.temperature_k() == pytest.approx(304.65)
    device.body_temp_c = 58.0
    health = spd.health()
    assert health.level is HealthLevel.DEGRADED and "58.0 C" in health.message


def test_what_the_wrapper_lacks_is_not_supported_and_sends_nothing(
    device: SimDevice, spd: AureaSpd
) -> None:
    before = len(device.calls)
    for call in (
        lambda: spd.set_delay_ps(100),
        spd.delay_ps,
        lambda: spd.set_threshold_v(0.1),
        spd.threshold_v,
        lambda: spd.set_gate_width_ns(1.0),
        spd.gate_width_ns,
        lambda: spd.set_gate_frequency_hz(1e6),
        lambda: spd.set_bias_current_ua(10),
    ):
        with pytest.raises(NotSupportedError):
            call()
    assert len(device.calls) == before


def test_limits_are_checked_before_the_library_is_called(device: SimDevice, spd: AureaSpd) -> None:
    before = len(device.calls)
    for bad in (
        lambda: spd.set_efficiency_pct(15),  # between two offered values
        lambda: spd.set_efficiency_pct(float("nan")),
        lambda: spd.set_dead_time_ns(50),  # below 0.1 us
        lambda: spd.set_dead_time_ns(200_000),
        lambda: spd.set_mode(5),  # type: ignore[arg-type]
    ):
        with pytest.raises(OutOfRangeError):
            bad()
    assert len(device.calls) == before


# --- physics of the simulated detector through the real driver ------------------------------


def _rate(spd: AureaSpd, device: SimDevice, **settings: Any) -> float:
    for key, value in settings.items():
        setattr(device, key, value)
    return spd.count_rate_hz()


def test_gated_counts_follow_light_efficiency_temperature_and_dead_time(
    device: SimDevice, spd: AureaSpd
) -> None:
    spd.set_mode(DetectorMode.GATED)
    spd.set_dead_time_ns(1_000)
    spd.arm()
    dark = _rate(spd, device, photons_per_gate=0.0)
    lit = _rate(spd, device, photons_per_gate=0.1)
    assert 0 < dark < lit
    warm_dark = _rate(spd, device, photons_per_gate=0.0, body_temp_c=35.0)
    assert warm_dark == pytest.approx(2 * dark, rel=0.01)  # dark counts double per 10 C
    wide_dark = _rate(spd, device, body_temp_c=25.0, gate_width_ns=2.0)
    assert wide_dark == pytest.approx(2 * dark, rel=0.01)  # dark probability per gate width
    device.gate_width_ns = 1.0
    spd.set_efficiency_pct(20)
    assert _rate(spd, device, photons_per_gate=0.1) > lit
    spd.set_dead_time_ns(50_000)  # more gates lost after each click
    assert _rate(spd, device, photons_per_gate=0.1) < lit


def test_free_running_counts_saturate_at_the_inverse_dead_time(
    device: SimDevice, spd: AureaSpd
) -> None:
    spd.set_mode(DetectorMode.FREE_RUNNING)
    spd.set_dead_time_ns(10_000)
    spd.arm()
    bright = _rate(spd, device, photon_rate_hz=1e9)
    assert 0.99e5 < bright <= 1e5  # 1 / 10 us


# --- a vendor library's failures --------------------------------------------------------


def test_negative_return_codes_are_reported_errors(device: SimDevice, spd: AureaSpd) -> None:
    device.fail_next = True
    with pytest.raises(InstrumentReportedError, match="setDeadtime"):
        spd.set_dead_time_ns(2_000)
    device.fail_next = True
    with pytest.raises(InstrumentReportedError, match="getEfficiency"):
        spd.efficiency_pct()


PUBLIC: list[Callable[[AureaSpd], object]] = [
    lambda d: d.set_efficiency_pct(20),
    lambda d: d.efficiency_pct(),
    lambda d: d.set_dead_time_ns(5_000),
    lambda d: d.dead_time_ns(),
    lambda d: d.set_mode(DetectorMode.GATED),
    lambda d: d.mode(),
    lambda d: d.arm(),
    lambda d: d.disarm(),
    lambda d: d.status(),
    lambda d: d.count_rate_hz(),
    lambda d: d.gate_frequency_hz(),
    lambda d: d.temperature_k(),
    lambda d: d.identify(),
    lambda d: d.check_settings(),
]


@pytest.mark.parametrize("fault", ["fail_next", "garbage", "raise_next"])
def test_only_typed_errors_leave_any_public_method(
    device: SimDevice, spd: AureaSpd, fault: str
) -> None:
    for call in PUBLIC:
        if not spd._lib:  # a failed check closes the library: connect again
            spd.connect()
        setattr(device, fault, True)
        try:
            call(spd)
        except InstrumentError:
            pass
        setattr(device, fault, False)
    health = spd.health()  # never raises
    assert health.level in set(HealthLevel)


def test_odd_values_are_protocol_errors(device: SimDevice, spd: AureaSpd) -> None:
    device.body_temp_c = float("nan")
    with pytest.raises(ProtocolError):
        spd.temperature_k()
    device.output = 3
    with pytest.raises(ProtocolError, match="unknown state"):
        spd.status()


def test_a_bad_range_text_fails_connect(device: SimDevice) -> None:
    device.efficiency_text = "n/a"
    d = AureaSpd("spd0", "", 1.0, FAST)
    with pytest.raises(ProtocolError, match="no efficiencies"):
        d.connect()
    assert not device.is_open  # closed again


def test_no_device_no_library_and_a_name_not_found(
    device: SimDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DriverConfigError, match="SPD_OEM_0042"):
        AureaSpd("spd0", "SPD_OEM_9999", 1.0, FAST).connect()
    device.names = []
    with pytest.raises(DriverUnavailableError, match="no Aurea detector"):
        AureaSpd("spd0", "", 1.0, FAST).connect()
    monkeypatch.delitem(sys.modules, "SPD_OEM")
    d = AureaSpd("spd0", "", 1.0, AureaSpdOptions(vendor_module="no_such_aurea_module"))
    with pytest.raises(DriverUnavailableError, match="not installed"):
        d.connect()
    with pytest.raises(NotConnectedError):
        d.set_efficiency_pct(10)


def test_a_reopen_waits_out_the_gap_the_library_needs(device: SimDevice) -> None:
    device.min_reopen_s = 0.2  # the stand-in crashes on an earlier re-open
    d = AureaSpd("spd0", "", 1.0, AureaSpdOptions(reopen_gap_s=0.25))
    d.connect()
    d.close()
    start = time.monotonic()
    d.connect()  # would raise without the wait
    assert time.monotonic() - start >= 0.2
    d.close()


# --- power cycles and a swapped unit ------------------------------------------------------


def test_a_power_cycled_detector_is_found_by_health_and_put_back(
    device: SimDevice, spd: AureaSpd
) -> None:
    spd.set_efficiency_pct(25)
    spd.set_dead_time_ns(20_000)
    spd.set_mode(DetectorMode.FREE_RUNNING)
    spd.arm()
    device.power_cycle()
    device.is_open = True
    order: list[str] = []
    device.calls = order
    health = spd.health()
    assert health.level is HealthLevel.DEGRADED and health.restored
    assert (device.efficiency_pct, device.dead_time_us, device.mode, device.output) == (
        25,
        20.0,
        0,
        1,
    )
    sets = [c for c in order if c.startswith("set")]
    assert sets[-1] == "setOutputState"  # arming comes back last
    assert spd.health().level is HealthLevel.OK


def test_safe_state_is_not_undone_by_a_restore(device: SimDevice, spd: AureaSpd) -> None:
    spd.arm()
    spd.safe_state()
    device.power_cycle()
    device.is_open = True
    spd.health()
    assert device.output == 0


def test_another_unit_at_reconnect_is_refused_naming_both(device: SimDevice, spd: AureaSpd) -> None:
    spd.set_efficiency_pct(20)
    spd.close()
    device.version = "SPD_OEM_A/0077/v1.3"
    device.efficiency_pct = 10  # the other unit's own setting
    device.calls = []
    with pytest.raises(InstrumentChangedError) as err:
        spd.connect()
    assert "0042" in str(err.value) and "0077" in str(err.value)
    assert not [c for c in device.calls if c.startswith("set")]  # nothing set on it
    assert not device.is_open


# --- registry and CLI ------------------------------------------------------------------------


def test_registered_and_probed(device: SimDevice, capsys: pytest.CaptureFixture[str]) -> None:
    assert registry.known_drivers()["aurea_spd"].interface == "SinglePhotonDetector"
    assert main(["drivers", "list", "--json"]) == 0
    assert "aurea_spd" in capsys.readouterr().out
    found = registry.probe("aurea:SPD_OEM", 1.0)
    assert found["suggested_drivers"] == ["aurea_spd"] and "0042" in found["identity"]
    assert not device.is_open  # the probe closes what it opened
    with pytest.raises(DriverConfigError):
        registry.probe("aurea:not a module", 1.0)
    time.sleep(AureaSpdOptions().reopen_gap_s)
    assert main(["drivers", "probe", "aurea:", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["suggested_drivers"] == ["aurea_spd"]
    device.names = []
    assert main(["drivers", "probe", "aurea:"]) == 1
    assert "no Aurea detector" in capsys.readouterr().err


# --- a hostile library: every public method, random junk from every call ------------------

JUNK: list[Any] = [
    None,
    -1,
    -32768,
    True,
    "garbage",
    b"\x00\xff",
    (),
    (0,),
    (-1, 0),
    ("0", 5),
    (0, float("nan")),
    (0, float("inf"), 1.0),
    (0, 1e300),
    (0, True),
    (0, -5),
    (0, "", ""),
    (0, None, None),
    (0, [1, 2]),
    ([], "2"),
    (["SPD_OEM_0042"], 3),
]


@pytest.mark.parametrize("seed", range(3))
def test_a_hostile_library_lets_only_typed_errors_escape(
    device: SimDevice, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    from tests.drivers.test_hostile_transport import exercise

    rng = random.Random(seed)
    names = [n for n in dir(aurea_standin) if n[:1].islower() and n[:3] in ("get", "set", "ope")]
    names += ["listDevices", "closeDevice"]

    def hostile(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            roll = rng.random()
            if roll < 0.15:
                raise OSError("exception: access violation")
            if roll < 0.45:
                return rng.choice(JUNK)
            return real(*args)

        return call

    for name in set(names):
        monkeypatch.setattr(aurea_standin, name, hostile(getattr(aurea_standin, name)))
    spd = AureaSpd("dut", "", 0.5, FAST)

    def reconnect() -> None:
        try:
            spd.connect()
        except InstrumentError:
            pass

    reconnect()
    found = exercise(spd, reconnect, rng, 300)
    found.check()
