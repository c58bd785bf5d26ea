"""The Single Quantum SNSPD driver against its simulator over TCP on loopback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from drivers.errors import (
    ConnectionLostError,
    DriverConfigError,
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    NotConnectedError,
    NotSupportedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.interfaces import DetectorMode, DetectorStatus, HealthLevel
from drivers.netsim.single_quantum import SingleQuantumSim
from drivers.single_quantum import SingleQuantumOptions, SingleQuantumSnspd, parse_objects


@pytest.fixture
def sim() -> Iterator[SingleQuantumSim]:
    with SingleQuantumSim(detectors=4) as s:
        yield s


def _snspd(
    sim: SingleQuantumSim, channel: int = 2, timeout_s: float = 0.3, reconnect_s: float = 0.2
) -> SingleQuantumSnspd:
    opts = SingleQuantumOptions(
        channel=channel,
        counts_port=sim.counts_port,
        measurement_period_ms=20,
        reconnect_timeout_s=reconnect_s,
    )
    return SingleQuantumSnspd("snspd0", sim.url, timeout_s, opts)


@pytest.fixture
def det(sim: SingleQuantumSim) -> Iterator[SingleQuantumSnspd]:
    d = _snspd(sim)
    d.connect()
    yield d
    d.close()


def test_parse_objects_splits_back_to_back_json() -> None:
    assert parse_objects('{"a": 1}{"b": [2]} {"c": null}') == [{"a": 1}, {"b": [2]}, {"c": None}]
    with pytest.raises(ValueError):
        parse_objects('{"a": 1}{"b"')


def test_connect_sets_the_measurement_period(
    sim: SingleQuantumSim, det: SingleQuantumSnspd
) -> None:
    assert sim.state.period_ms == 20
    assert "4 detectors" in det.identify()
    assert det.status() is DetectorStatus.DISARMED and det.health().level is HealthLevel.OK
    assert det.temperature_k() == pytest.approx(2.45)


def test_settings_change_only_this_detector(sim: SingleQuantumSim, det: SingleQuantumSnspd) -> None:
    sim.state.bias_ua = [5.0, 6.0, 7.0, 8.0]
    det.set_bias_current_ua(11.5)
    det.set_threshold_v(0.08)
    assert sim.state.bias_ua == [5.0, 11.5, 7.0, 8.0]
    assert sim.state.trigger_mv == [100.0, 80.0, 100.0, 100.0]
    assert det.bias_current_ua() == 11.5
    assert det.threshold_v() == pytest.approx(0.08)


def test_a_setting_the_controller_did_not_take_is_reported(
    sim: SingleQuantumSim, det: SingleQuantumSnspd
) -> None:
    sim.bias_limit_ua = 20.0
    with pytest.raises(InstrumentReportedError, match="to 20 uA, not 25"):
        det.set_bias_current_ua(25.0)
    det.set_bias_current_ua(19.0)


def test_bias_sets_efficiency_and_overbias_latches(
    sim: SingleQuantumSim, det: SingleQuantumSnspd
) -> None:
    sim.illuminate(2, 100_000.0)
    det.set_bias_current_ua(12.0)
    assert det.count_rate_hz() == 0.0  # disarmed: bias off
    det.arm()
    assert det.status() is DetectorStatus.ARMED
    rate = det.count_rate_hz()
    assert rate == pytest.approx(sim.rate_hz(1), rel=0.2) and rate > 50_000
    det.set_bias_current_ua(16.0)  # above the 15 uA switching current
    assert det.status() is DetectorStatus.LATCHED
    assert det.health().level is HealthLevel.DEGRADED
    det.set_bias_current_ua(12.0)
    assert det.status() is DetectorStatus.LATCHED  # lowering the bias does not unlatch
    det.reset_latch()
    assert det.status() is DetectorStatus.DISARMED
    det.arm()
    assert det.status() is DetectorStatus.ARMED
    det.safe_state()
    assert not sim.state.enabled


def test_what_an_snspd_lacks_is_not_supported_and_sends_nothing(
    sim: SingleQuantumSim, det: SingleQuantumSnspd
) -> None:
    before = sim.requests_seen
    calls: list[Callable[[], object]] = [
        lambda: det.set_efficiency_pct(20),
        det.efficiency_pct,
        lambda: det.set_dead_time_ns(50),
        det.dead_time_ns,
        lambda: det.set_delay_ps(0),
        det.delay_ps,
        lambda: det.set_gate_frequency_hz(1e8),
        det.gate_frequency_hz,
        lambda: det.set_gate_width_ns(1.0),
        det.gate_width_ns,
        lambda: det.set_mode(DetectorMode.GATED),
        det.mode,
    ]
    for call in calls:
        with pytest.raises(NotSupportedError) as info:
            call()
        assert info.value.instrument == "snspd0"
    with pytest.raises(OutOfRangeError):
        det.set_bias_current_ua(95.0)
    with pytest.raises(OutOfRangeError):
        det.set_threshold_v(2.0)
    assert sim.requests_seen == before


def test_channel_beyond_the_controller_is_a_config_error(sim: SingleQuantumSim) -> None:
    d = _snspd(sim, channel=5)
    with pytest.raises(DriverConfigError, match="4 detectors"):
        d.connect()
    with pytest.raises(NotConnectedError):
        d.identify()


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("garble", ProtocolError),
        ("no_reply", InstrumentTimeoutError),
        ("error", InstrumentReportedError),
        ("drop", ConnectionLostError),
    ],
)
def test_faults_raise_typed_errors(
    sim: SingleQuantumSim, fault: str, error: type[InstrumentError]
) -> None:
    det = _snspd(sim, timeout_s=0.1)
    det.connect()
    sim.inject(fault)
    with pytest.raises(error) as info:
        det.set_bias_current_ua(9.0)
    assert info.value.instrument == "snspd0" and info.value.reason
    det.set_bias_current_ua(9.0)  # the next command works (a dropped connection is reopened)
    assert sim.state.bias_ua[1] == 9.0
    det.close()


def _fake_controller(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """A TCP peer that answers the first message with ``reply`` and stays silent."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(reply)
            conn.recv(4096)  # until the driver hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    "reply",
    [
        b"\xff\xfe\x17",  # not text
        b"[1, 2, 3]\x17",  # JSON, but not a label message
        json.dumps({"label": "NumberOfDetectors", "value": {"value": "four"}}).encode() + b"\x17",
        b"x" * 70_000,  # no terminator ever: times out, never an untyped error
    ],
)
def test_garbage_from_a_wrong_peer_is_typed(reply: bytes) -> None:
    listener, thread = _fake_controller(reply)
    port = listener.getsockname()[1]
    det = SingleQuantumSnspd("snspd0", f"127.0.0.1:{port}", 0.2)
    with pytest.raises(InstrumentError):
        det.connect()
    det.close()
    listener.close()
    thread.join(timeout=2)


def test_unreachable_and_closed(sim: SingleQuantumSim) -> None:
    det = SingleQuantumSnspd("snspd0", "tcp://127.0.0.1:1", 0.2)
    with pytest.raises(ConnectionLostError):
        det.connect()
    assert det.health().level is HealthLevel.FAULT
    det.safe_state()  # never connected: nothing to switch off, no error
    with pytest.raises(DriverConfigError):
        SingleQuantumSnspd("snspd0", "tcp://:12000")


def test_controller_gone_mid_session_every_public_method_raises_typed(
    sim: SingleQuantumSim,
) -> None:
    det = _snspd(sim, timeout_s=0.1, reconnect_s=0.02)
    det.connect()
    sim.stop()
    calls: list[Callable[[], object]] = [
        det.identify,
        det.status,
        det.arm,
        det.disarm,
        det.reset_latch,
        det.bias_current_ua,
        lambda: det.set_bias_current_ua(5.0),
        det.threshold_v,
        lambda: det.set_threshold_v(0.1),
        det.temperature_k,
        det.count_rate_hz,
        det.safe_state,
    ]
    for call in calls:
        with pytest.raises(InstrumentError):
            call()
    assert det.health().level is HealthLevel.FAULT
