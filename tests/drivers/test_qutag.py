"""The quTAG driver against a stand-in shaped like qutools' ``QuTAG_MC`` wrapper."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from drivers import registry
from drivers.errors import (
    DriverConfigError,
    DriverUnavailableError,
    InstrumentError,
    InstrumentReportedError,
    NotConnectedError,
    NotSupportedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.interfaces import Edge, HealthLevel, ReferenceClock
from drivers.qutag import QutagOptions, QutagTimeTagger
from qkdnode.cli import main
from tests.drivers import qutag_standin
from tests.drivers.qutag_standin import SimDevice


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> SimDevice:
    dev = SimDevice()
    monkeypatch.setattr(qutag_standin, "DEVICE", dev)
    monkeypatch.setitem(sys.modules, "QuTAG_MC", qutag_standin)
    return dev


@pytest.fixture
def tagger(device: SimDevice) -> Iterator[QutagTimeTagger]:
    tt = QutagTimeTagger("qt0", "", 1.0, QutagOptions(channels=[1, 2], exposure_ms=100))
    tt.connect()
    yield tt
    tt.close()


def test_connect_enables_the_channels_and_exposure(
    device: SimDevice, tagger: QutagTimeTagger
) -> None:
    assert device.enabled_mask == 0b11 and device.exposure_ms == 100
    assert tagger.resolution_ps() == 1.0
    assert "quTAG" in tagger.identify() and tagger.health().level is HealthLevel.OK


def test_settings_round_trip(device: SimDevice, tagger: QutagTimeTagger) -> None:
    tagger.set_trigger_level_v(1, 0.35)
    tagger.set_edge(1, Edge.FALLING)  # keeps the threshold
    tagger.set_input_delay_ps(2, -1200)
    tagger.set_reference_clock(ReferenceClock.EXTERNAL)
    assert device.conditioning[1] == (3, False, 0.35)
    assert tagger.trigger_level_v(1) == 0.35 and tagger.edge(1) is Edge.FALLING
    assert tagger.input_delay_ps(2) == -1200
    assert tagger.reference_clock() is ReferenceClock.EXTERNAL
    with pytest.raises(NotSupportedError):
        tagger.set_dead_time_ps(1, 1000)


def test_limits_checked_before_the_library_is_called(
    device: SimDevice, tagger: QutagTimeTagger
) -> None:
    before = len(device.calls)
    for bad in (
        lambda: tagger.set_trigger_level_v(1, 4.0),
        lambda: tagger.set_input_delay_ps(1, 10**6),
        lambda: tagger.set_edge(5, Edge.RISING),
    ):
        with pytest.raises(OutOfRangeError):
            bad()
    assert len(device.calls) == before


def test_stream_and_counts(device: SimDevice, tagger: QutagTimeTagger) -> None:
    device.rates_hz = {1: 1e6, 2: 2e6, 3: 5e6}  # channel 3 is not enabled
    tagger.set_input_delay_ps(2, 100)
    device.advance_s(0.5)  # before the stream: not delivered
    tagger.start_stream()
    device.advance_s(0.001)
    block = tagger.read_block(0.1)
    assert block is not None and not block.overflow
    t = block.tags["time_ps"]
    assert np.all(np.diff(t) >= 0) and set(block.tags["channel"]) == {1, 2}
    assert int(np.sum(block.tags["channel"] == 1)) == 1000
    assert int(np.sum(block.tags["channel"] == 2)) == 2000
    assert t[0] >= 500_000_000_000  # tags from the stream start on
    assert tagger.read_block(0.02) is None  # nothing new
    rates = tagger.count_rates_hz()
    assert rates == {1: pytest.approx(1e6), 2: pytest.approx(2e6)}


def test_buffer_overflow_is_flagged(device: SimDevice, tagger: QutagTimeTagger) -> None:
    device.buffer_size = 1000
    tagger.close()
    tagger.connect()
    device.rates_hz = {1: 1e6}
    tagger.start_stream()
    device.advance_s(0.01)  # 10000 tags into a 1000-tag buffer
    block = tagger.read_block(0.1)
    assert block is not None and block.overflow and len(block) == 1000


def test_error_codes_are_typed_errors(device: SimDevice, tagger: QutagTimeTagger) -> None:
    device.fail_next = 1
    with pytest.raises(InstrumentReportedError, match="Receive timed out"):
        tagger.set_trigger_level_v(1, 0.2)
    tagger.set_trigger_level_v(1, 0.2)


def test_garbage_and_exceptions_from_the_library_are_typed(
    device: SimDevice, tagger: QutagTimeTagger
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: tagger.trigger_level_v(1),
        lambda: tagger.edge(1),
        lambda: tagger.set_edge(1, Edge.RISING),
        lambda: tagger.set_trigger_level_v(1, 0.1),
    ]
    device.garbage = True
    for call in calls:
        with pytest.raises(ProtocolError):
            call()
    tagger.start_stream()
    with pytest.raises(ProtocolError):
        tagger.read_block(0.01)
    device.garbage = False
    every: list[Callable[[], object]] = [
        tagger.identify,
        lambda: tagger.set_input_delay_ps(1, 0),
        lambda: tagger.input_delay_ps(1),
        *calls,
        lambda: tagger.set_reference_clock(ReferenceClock.INTERNAL),
        tagger.reference_clock,
        tagger.count_rates_hz,
        tagger.start_stream,
        lambda: tagger.read_block(0.01),
    ]
    for call in every:
        device.raise_next = True
        with pytest.raises(InstrumentError):
            call()
    device.raise_next = True
    assert tagger.health().level is HealthLevel.FAULT


def test_no_device_and_no_library(device: SimDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    device.present = False
    tt = QutagTimeTagger("qt0")
    with pytest.raises(DriverUnavailableError, match="no quTAG"):
        tt.connect()
    with pytest.raises(NotConnectedError):
        tt.identify()
    tt.safe_state()
    monkeypatch.delitem(sys.modules, "QuTAG_MC")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "qutag" not in p.lower()])
    with pytest.raises(DriverUnavailableError, match="not installed"):
        QutagTimeTagger("qt0", options=QutagOptions(vendor_module="QuTAG_absent")).connect()


def test_probe_identifies_through_the_wrapper(
    device: SimDevice, capsys: pytest.CaptureFixture[str]
) -> None:
    found = registry.probe("qutag:QuTAG_MC", 1.0)
    assert found["suggested_drivers"] == ["qutag"] and "quTAG" in found["identity"]
    with pytest.raises(DriverConfigError):
        registry.probe("qutag:not a module", 1.0)
    assert main(["drivers", "probe", "qutag:", "--json"]) == 0  # the default module name
    assert json.loads(capsys.readouterr().out)["suggested_drivers"] == ["qutag"]
    device.present = False
    assert main(["drivers", "probe", "qutag:"]) == 1
    assert "no quTAG found" in capsys.readouterr().err


def test_odd_shapes_from_the_wrapper_are_protocol_errors(
    device: SimDevice, tagger: QutagTimeTagger, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = tagger._dev
    monkeypatch.setattr(dev, "getCoincCounters", lambda: {"counts": 3})
    monkeypatch.setattr(dev, "getClockState", lambda: 7)
    monkeypatch.setattr(dev, "getChannelDelay", lambda channel: True)
    monkeypatch.setattr(dev, "getLastTimestamps", lambda reset: (5, None, float("inf")))
    for call in (
        tagger.count_rates_hz,
        tagger.reference_clock,
        lambda: tagger.input_delay_ps(1),
        lambda: (tagger.start_stream(), tagger.read_block(0.01)),
    ):
        with pytest.raises(ProtocolError):
            call()
    with pytest.raises(OutOfRangeError):
        tagger.set_edge(1, 3)  # type: ignore[arg-type]
    with pytest.raises(OutOfRangeError):
        tagger.set_reference_clock("external")  # type: ignore[arg-type]
