"""The Swabian driver against a stand-in shaped like the vendor's ``TimeTagger`` module."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from drivers.errors import (
    DriverUnavailableError,
    InstrumentError,
    InstrumentTimeoutError,
    NotConnectedError,
    ProtocolError,
)
from drivers.interfaces import TAG_DTYPE, HealthLevel
from drivers.swabian import SwabianOptions, SwabianTimeTagger
from tests.drivers.swabian_standin import PS_PER_S, SimDevice, make_module


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> SimDevice:
    dev = SimDevice(serial="2138000ABC", channels=(1, 2, 3, 4))
    monkeypatch.setitem(sys.modules, "TimeTagger", make_module(dev))
    return dev


@pytest.fixture
def tagger(device: SimDevice) -> Iterator[SwabianTimeTagger]:
    tt = SwabianTimeTagger("tt0", "", 1.0, SwabianOptions(channels=[1, 2], countrate_window_s=0.1))
    tt.connect()
    yield tt
    tt.close()


def test_standin_has_the_vendor_shapes(device: SimDevice) -> None:
    """Guard the stand-in itself: data members are not callable, accessors are methods."""
    tt = sys.modules["TimeTagger"]
    stream = tt.TimeTagStream(tt.createTimeTagger(), 1000, [1])
    buf = stream.getData()
    for member in ("size", "hasOverflows", "tStart", "tGetData"):
        assert not callable(getattr(buf, member))
    for method in ("getTimestamps", "getChannels", "getEventTypes", "getMissedEvents"):
        assert callable(getattr(buf, method))


def test_read_block_takes_the_buffer_fields_as_data_members(
    device: SimDevice, tagger: SwabianTimeTagger
) -> None:
    device.set_rate(1, 1000.0)
    device.set_rate(2, 2000.0)
    device.set_rate(3, 5000.0)  # not subscribed
    tagger.start_stream()
    device.advance(0.01)
    block = tagger.read_block(0.0)
    assert block is not None and block.tags.dtype == TAG_DTYPE
    assert (int((block.tags["channel"] == 1).sum()), int((block.tags["channel"] == 2).sum())) == (
        10,
        20,
    )
    assert set(block.tags["channel"].tolist()) == {1, 2}
    assert np.all(np.diff(block.tags["time_ps"]) >= 0)
    assert (block.overflow, block.missed_events) == (False, 0)
    assert (block.start_ps, block.stop_ps) == (0, round(0.01 * PS_PER_S))
    assert tagger.read_block(0.0) is None  # getData cleared the buffer


def test_read_block_reports_an_overflow_as_the_block_flag(
    device: SimDevice, tagger: SwabianTimeTagger
) -> None:
    device.set_rate(1, 1e6)
    tagger.start_stream()
    device.advance(0.001)
    lost = device.overflow(0.001)
    device.advance(0.001)
    block = tagger.read_block(0.0)
    assert block is not None
    assert block.overflow is True
    assert block.missed_events == lost[1] == 1000
    assert len(block) == 2000 and set(block.tags["channel"].tolist()) == {1}
    assert (block.start_ps, block.stop_ps) == (0, round(0.003 * PS_PER_S))


def test_an_overflow_with_no_tags_is_still_reported(
    device: SimDevice, tagger: SwabianTimeTagger
) -> None:
    tagger.start_stream()
    device.overflow(0.001)  # nothing was lost, but the device was in overflow
    block = tagger.read_block(0.0)
    assert block is not None and len(block) == 0 and block.overflow is True


def test_a_block_spans_the_empty_polls_before_it(
    device: SimDevice, tagger: SwabianTimeTagger
) -> None:
    polls = 0

    def between_polls() -> None:  # 1 ms passes between polls; tags from the fourth on
        nonlocal polls
        polls += 1
        if polls == 4:
            device.set_rate(1, 1e5)
        device.advance(0.001)

    tagger.start_stream()
    device.poll_hook = between_polls
    block = tagger.read_block(1.0)
    assert block is not None and len(block) == 100 and polls == 4
    assert (block.start_ps, block.stop_ps) == (0, round(0.004 * PS_PER_S))


def test_count_rate_is_the_rate_over_the_window_not_since_connect(
    device: SimDevice, tagger: SwabianTimeTagger
) -> None:
    device.set_rate(1, 1e3)
    device.advance(10.0)  # the vendor's Countrate has averaged 1 kHz since connect
    device.set_rate(1, 1e4)
    device.advance(1.0)
    t0 = device.now_ps
    rates = tagger.count_rates_hz()
    assert rates[1] == pytest.approx(1e4, rel=0.01)  # the average since connect is ~1.8 kHz
    assert rates[2] == 0.0 and set(rates) == {1, 2}
    assert device.now_ps - t0 == round(0.1 * PS_PER_S)  # one window, options.countrate_window_s
    device.set_rate(1, 500.0)
    assert tagger.count_rates_hz()[1] == pytest.approx(500.0, rel=0.03)


def test_count_rate_window_that_never_ends_is_a_timeout(
    device: SimDevice, tagger: SwabianTimeTagger
) -> None:
    device.stalled = True
    with pytest.raises(InstrumentTimeoutError, match="count-rate window"):
        tagger.count_rates_hz()


def test_connect_failing_after_create_frees_the_tagger(device: SimDevice) -> None:
    device.fail("Countrate.__init__", RuntimeError("USB transfer failed"))
    tt = SwabianTimeTagger("tt0")
    with pytest.raises(ProtocolError, match="USB transfer failed"):
        tt.connect()
    assert not device.in_use
    device.heal()
    tt.connect()
    assert tt.identify() == "Swabian,Time Tagger Ultra,2138000ABC"
    tt.close()
    assert not device.in_use


def test_connect_to_a_missing_serial_is_unavailable(device: SimDevice) -> None:
    with pytest.raises(DriverUnavailableError, match="No Time Tagger"):
        SwabianTimeTagger("tt0", "0000000000").connect()


Call = Callable[[SwabianTimeTagger], object]

VENDOR_FAULTS: list[tuple[str, Exception, Call]] = [
    ("TimeTagger.getModel", RuntimeError("device gone"), lambda t: t.identify()),
    ("TimeTagger.setInputDelay", ValueError("bad delay"), lambda t: t.set_input_delay_ps(1, 5)),
    ("TimeTagger.getInputDelay", RuntimeError("device gone"), lambda t: t.input_delay_ps(1)),
    ("TimeTagger.setTriggerLevel", ValueError("bad level"), lambda t: t.set_trigger_level_v(1, 9)),
    ("TimeTagger.getTriggerLevel", RuntimeError("gone"), lambda t: t.trigger_level_v(1)),
    ("TimeTagStream.__init__", RuntimeError("no memory"), lambda t: t.start_stream()),
    ("Countrate.startFor", RuntimeError("device gone"), lambda t: t.count_rates_hz()),
    ("Countrate.waitUntilFinished", RuntimeError("gone"), lambda t: t.count_rates_hz()),
    ("Countrate.getData", RuntimeError("device gone"), lambda t: t.count_rates_hz()),
]


@pytest.mark.parametrize(
    ("call", "exc", "action"), VENDOR_FAULTS, ids=[f[0] for f in VENDOR_FAULTS]
)
def test_vendor_errors_leave_as_typed_errors(
    device: SimDevice, tagger: SwabianTimeTagger, call: str, exc: Exception, action: Call
) -> None:
    device.fail(call, exc)
    with pytest.raises(ProtocolError) as info:
        action(tagger)
    assert info.value.__cause__ is exc and info.value.instrument == "tt0"


@pytest.mark.parametrize("call", ["TimeTagStream.getData", "TimeTagStream.stop"])
def test_stream_errors_leave_as_typed_errors(
    device: SimDevice, tagger: SwabianTimeTagger, call: str
) -> None:
    tagger.start_stream()
    device.fail(call, RuntimeError("USB transfer failed"))
    with pytest.raises(ProtocolError, match="USB transfer failed"):
        tagger.read_block(0.0) if call.endswith("getData") else tagger.stop_stream()


def test_unknown_channel_is_the_vendors_value_error_typed(tagger: SwabianTimeTagger) -> None:
    with pytest.raises(ProtocolError, match="channel 9"):
        tagger.set_input_delay_ps(9, 100)


def test_settings_round_trip(device: SimDevice, tagger: SwabianTimeTagger) -> None:
    tagger.set_input_delay_ps(2, 1234)
    tagger.set_trigger_level_v(1, 0.25)
    assert (tagger.input_delay_ps(2), tagger.trigger_level_v(1)) == (1234, 0.25)
    assert device.input_delay_ps[2] == 1234


def test_health_is_a_fault_not_an_exception(device: SimDevice, tagger: SwabianTimeTagger) -> None:
    assert tagger.health().level is HealthLevel.OK
    device.fail("TimeTagger.getSerial", RuntimeError("device gone"))
    assert tagger.health().level is HealthLevel.FAULT


def test_closed_driver_refuses_with_not_connected(tagger: SwabianTimeTagger) -> None:
    tagger.close()
    actions: list[Call] = [
        SwabianTimeTagger.identify,
        SwabianTimeTagger.start_stream,
        SwabianTimeTagger.count_rates_hz,
        lambda t: t.read_block(0.0),
        lambda t: t.input_delay_ps(1),
    ]
    for action in actions:
        with pytest.raises(NotConnectedError):
            action(tagger)
    tagger.safe_state()  # never raises


def _typed_or_ok(action: Callable[[], object]) -> None:
    """Run ``action``: returning or raising an InstrumentError pass, anything else fails."""
    try:
        action()
    except InstrumentError:
        pass


def test_no_untyped_exception_escapes_any_public_method(device: SimDevice) -> None:
    """With the vendor working, then with every vendor call failing, the public methods
    return or raise an InstrumentError subclass, nothing else."""
    device.set_rate(1, 1e5)
    device.fail("Countrate.__init__", RuntimeError("USB transfer failed"))
    tt = SwabianTimeTagger("tt0", "", 1.0, SwabianOptions(channels=[1, 2]))
    _typed_or_ok(tt.connect)
    device.heal()
    tt.connect()
    actions: list[Callable[[], object]] = [
        tt.identify,
        tt.health,
        lambda: tt.set_input_delay_ps(1, 1),
        lambda: tt.input_delay_ps(1),
        lambda: tt.set_trigger_level_v(1, 0.1),
        lambda: tt.trigger_level_v(1),
        tt.start_stream,
        lambda: device.advance(0.001),
        lambda: device.overflow(0.001),
        lambda: tt.read_block(0.0),
        tt.count_rates_hz,
        tt.stop_stream,
        tt.safe_state,
    ]
    for action in actions:
        _typed_or_ok(action)
    tt.start_stream()
    for name in [
        "TimeTagger.getSerial",
        "TimeTagger.getModel",
        "TimeTagger.setInputDelay",
        "TimeTagger.getInputDelay",
        "TimeTagger.setTriggerLevel",
        "TimeTagger.getTriggerLevel",
        "TimeTagStream.__init__",
        "TimeTagStream.getData",
        "TimeTagStream.stop",
        "Countrate.startFor",
        "Countrate.waitUntilFinished",
        "Countrate.getData",
    ]:
        device.fail(name, RuntimeError(f"{name} failed"))
    for action in actions:
        _typed_or_ok(action)
    assert tt.health().level is HealthLevel.FAULT
    tt.close()


def test_power_cycled_tagger_gets_its_delays_and_levels_back(
    device: SimDevice, tagger: SwabianTimeTagger
) -> None:
    tagger.set_input_delay_ps(1, 50)
    tagger.set_trigger_level_v(2, 0.25)
    device.power_cycle()
    health = tagger.health()
    assert health.level is HealthLevel.DEGRADED
    assert set(health.restored) == {"input_delay_ps[1]: 0 -> 50", "trigger_level_v[2]: 0.5 -> 0.25"}
    assert device.input_delay_ps[1] == 50 and device.trigger_level_v[2] == 0.25
    assert tagger.health().level is HealthLevel.OK
    # and after the node's recovery (close, connect) of a tagger that came back at defaults
    tagger.close()
    device.power_cycle()
    tagger.connect()
    assert tagger.input_delay_ps(1) == 50 and tagger.trigger_level_v(2) == 0.25
