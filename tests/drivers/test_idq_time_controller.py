"""The ID Quantique Time Controller driver against its simulator over ZeroMQ on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from drivers.errors import (
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    NotConnectedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.idq_time_controller import IdqTimeController, IdqTimeControllerOptions
from drivers.interfaces import TAG_DTYPE, Edge, HealthLevel, ReferenceClock, TagBlock
from drivers.scpisim.idq_time_controller import IdqTimeControllerSim
from drivers.transports.zmq_req import ZmqReqTransport
from tests.drivers.helpers import ExpectedProtocolTransport

PERIOD_PS = 10_000_000  # 100 kHz reference


@pytest.fixture
def sim() -> Iterator[IdqTimeControllerSim]:
    with IdqTimeControllerSim(reference_period_ps=PERIOD_PS, chunk_s=0.005) as s:
        yield s


@pytest.fixture
def tc(sim: IdqTimeControllerSim) -> Iterator[IdqTimeController]:
    opts = IdqTimeControllerOptions(
        dlt_endpoint=sim.dlt_endpoint,
        channels=[1, 2],
        reference_period_ps=PERIOD_PS,
        counter_integration_ms=50,
    )
    dev = IdqTimeController("tc0", sim.endpoint, 0.3, opts)
    dev.connect()
    yield dev
    dev.close()


def _collect(tc: IdqTimeController, n_min: int, budget_s: float = 3.0) -> TagBlock:
    blocks = []
    deadline = time.monotonic() + budget_s
    while sum(len(b) for b in blocks) < n_min and time.monotonic() < deadline:
        block = tc.read_block(0.05)
        if block is not None:
            blocks.append(block)
    tags = np.concatenate([b.tags for b in blocks]) if blocks else np.zeros(0, TAG_DTYPE)
    return TagBlock(np.sort(tags, order="time_ps"))


def test_connect_configures_inputs_and_counters(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    assert "ID1000" in tc.identify()
    assert sim.inputs[1].enabled and sim.inputs[2].enabled and not sim.inputs[3].enabled
    assert sim.inputs[1].integration_ms == 50 and sim.inputs[1].count_mode == "CYCL"
    assert tc.health().level is HealthLevel.OK


def test_settings_round_trip_through_the_controller(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    tc.set_input_delay_ps(2, 1500)
    tc.set_trigger_level_v(1, -0.25)
    tc.set_edge(2, Edge.FALLING)
    tc.set_dead_time_ps(1, 20_000)
    tc.set_reference_clock(ReferenceClock.EXTERNAL)
    assert (sim.delays_ps[2], sim.inputs[1].threshold_v, sim.inputs[2].edge) == (
        1500,
        -0.25,
        "FALLING",
    )
    assert (sim.inputs[1].dead_ps, sim.sync) == (20_000, "EXTERNAL")
    assert tc.input_delay_ps(2) == 1500
    assert tc.trigger_level_v(1) == pytest.approx(-0.25)  # the reply carries a unit: "-0.2500V"
    assert tc.edge(2) is Edge.FALLING and tc.edge(1) is Edge.RISING
    assert tc.dead_time_ps(1) == 20_000
    assert tc.reference_clock() is ReferenceClock.EXTERNAL
    assert tc.resolution_ps() == 1.0


def test_limits_are_checked_before_sending(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    before = sim.requests_seen
    for bad in (
        lambda: tc.set_trigger_level_v(1, 5.0),
        lambda: tc.set_input_delay_ps(1, -1),
        lambda: tc.set_dead_time_ps(2, float("nan")),  # type: ignore[arg-type]
        lambda: tc.set_edge(3, Edge.RISING),  # not a configured channel
    ):
        with pytest.raises(OutOfRangeError):
            bad()
    assert sim.requests_seen == before


def test_stream_puts_reference_index_and_timestamp_on_one_axis(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    """Rates 20 kHz and 50 kHz span several reference periods: rebuilt times are evenly
    spaced across period boundaries, with the delay and dead time the controller applies."""
    sim.set_rate(1, 20_000.0)
    sim.set_rate(2, 50_000.0)
    tc.set_input_delay_ps(2, 700)
    tc.start_stream()
    block = _collect(tc, 200)
    tc.stop_stream()
    t1 = block.tags["time_ps"][block.tags["channel"] == 1]
    t2 = block.tags["time_ps"][block.tags["channel"] == 2]
    assert len(t1) > 20 and len(t2) > 50
    assert set(np.diff(t1)) == {50_000_000} and set(np.diff(t2)) == {20_000_000}
    assert t2[0] % 20_000_000 == 700 and int(t1.max()) > 3 * PERIOD_PS
    assert not sim._streams  # the data link was told to stop
    assert sim.raw_send == {1: False, 2: False, 3: False, 4: False}


def test_dead_time_and_threshold_change_what_is_tagged(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    sim.set_rate(1, 100_000.0)
    sim.set_rate(2, 100_000.0)
    tc.set_dead_time_ps(1, 15_000_000)  # 1.5 pulse periods: every other pulse is lost
    tc.set_trigger_level_v(2, 0.9)  # above the 0.8 V pulses
    rates = tc.count_rates_hz()
    assert rates == {1: pytest.approx(50_000.0), 2: 0.0}


def test_controller_refusal_is_an_instrument_error(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    with pytest.raises(InstrumentReportedError, match="undefined header"):
        tc._set("INPU1:FOO 3")
    assert tc.identify()  # the REQ socket is still in step


@pytest.mark.parametrize(
    ("fault", "error"), [("garble", ProtocolError), ("no_reply", InstrumentTimeoutError)]
)
def test_bad_replies_raise_typed_errors_then_recover(
    sim: IdqTimeControllerSim, tc: IdqTimeController, fault: str, error: type[InstrumentError]
) -> None:
    sim.inject(fault)
    with pytest.raises(error) as info:
        tc.trigger_level_v(1)
    assert info.value.instrument == "tc0" and info.value.command == "INPU1:THRE?"
    assert tc.trigger_level_v(1) == pytest.approx(0.1)  # a fresh REQ socket, in step again


def test_garbage_numbers_and_stream_bytes_are_protocol_errors(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    sim.inputs[1].threshold_v = float("nan")  # the reply is "nanV"
    with pytest.raises(ProtocolError):
        tc.trigger_level_v(1)
    with pytest.raises(ProtocolError, match="whole number"):
        tc._decode([(1, b"\x00" * 15)])
    bad = np.zeros(1, dtype=[("ts", "<u8"), ("ref", "<u8")])
    bad["ts"] = PERIOD_PS  # a timestamp cannot reach the reference period
    with pytest.raises(ProtocolError, match="reference period"):
        tc._decode([(1, bad.tobytes())])


def test_unplugged_controller_every_public_method_raises_typed(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    assert isinstance(tc.transport, ZmqReqTransport)
    tc.timeout_s = tc.transport.timeout_s = 0.05
    sim.inject("down")
    calls = [
        tc.identify,
        lambda: tc.set_input_delay_ps(1, 10),
        lambda: tc.input_delay_ps(1),
        lambda: tc.set_trigger_level_v(1, 0.1),
        lambda: tc.trigger_level_v(1),
        lambda: tc.set_edge(1, Edge.RISING),
        lambda: tc.edge(1),
        lambda: tc.set_dead_time_ps(1, 0),
        lambda: tc.dead_time_ps(1),
        lambda: tc.set_reference_clock(ReferenceClock.INTERNAL),
        tc.reference_clock,
        tc.resolution_ps,
        tc.count_rates_hz,
        tc.start_stream,
    ]
    for call in calls:
        with pytest.raises(InstrumentError):
            call()
    assert tc.health().level is HealthLevel.FAULT
    assert not sim._streams  # the failed start told the data link to stop what it began
    tc.safe_state()  # nothing streaming: nothing to stop, no error
    sim.inject("up")
    assert "ID1000" in tc.identify()


def test_stop_reaches_the_data_link_when_the_controller_is_gone(
    sim: IdqTimeControllerSim, tc: IdqTimeController
) -> None:
    tc.start_stream()
    assert len(sim._streams) == 2
    assert isinstance(tc.transport, ZmqReqTransport)
    tc.transport.timeout_s = 0.05
    sim.inject("down")
    with pytest.raises(InstrumentTimeoutError):
        tc.safe_state()
    assert not sim._streams  # the data link answered and stopped both streams
    with pytest.raises(NotConnectedError):
        tc.read_block(0.01)  # the local sockets are closed all the same


def test_closed_driver_raises_not_connected(tc: IdqTimeController) -> None:
    tc.close()
    with pytest.raises(NotConnectedError):
        tc.identify()
    with pytest.raises(NotConnectedError):
        tc.read_block(0.01)
    tc.safe_state()
    assert tc.health().level is HealthLevel.FAULT


def test_wrong_identity_refused(sim: IdqTimeControllerSim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("drivers.scpisim.idq_time_controller.IDN", "Keysight,33522B,MY1,1.0")
    dev = IdqTimeController("tc0", sim.endpoint, 0.3)
    with pytest.raises(ProtocolError, match="not an ID900/ID1000"):
        dev.connect()
    assert not dev.transport.is_open


def test_pinned_messages_and_unparseable_numbers() -> None:
    """The exact messages of connect and a few settings; replies a parser could choke on
    (an infinite count, a threshold without digits) and a wrong edge are typed errors."""
    t = ExpectedProtocolTransport(
        [
            ("*IDN?", "ID Quantique,ID900,1234,1.0"),
            ("INPU3:ENAB ON", ""),
            ("INPU3:COUN:MODE CYCL;INTE 250", ""),
            ("INPU3:THRE -0.1500V", ""),
            ("DELA5:VALU 42", ""),
            ("INPU3:COUN?", "1e999"),
            ("INPU3:THRE?", "V"),
            ("DEVI:SYNC?", "GPS"),
            ("INPU3:EDGE RISI", "Error: settings conflict"),
        ]
    )
    opts = IdqTimeControllerOptions(channels=[3], counter_integration_ms=250, delay_block_offset=2)
    dev = IdqTimeController("tc0", "unused", transport=t, options=opts)
    dev.connect()
    dev.set_trigger_level_v(3, -0.15)
    dev.set_input_delay_ps(3, 42)
    with pytest.raises(ProtocolError):
        dev.count_rates_hz()
    with pytest.raises(ProtocolError):
        dev.trigger_level_v(3)
    with pytest.raises(ProtocolError):
        dev.reference_clock()
    with pytest.raises(OutOfRangeError, match="RISING, FALLING"):
        dev.set_edge(3, "UP")  # type: ignore[arg-type]
    with pytest.raises(InstrumentReportedError, match="settings conflict"):
        dev.set_edge(3, Edge.RISING)
    t.assert_done()
