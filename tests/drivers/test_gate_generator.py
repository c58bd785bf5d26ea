"""The ID1000 Time Controller as a detector's gate generator, against its simulator over
ZeroMQ on loopback: the exact messages, limits refused before sending, the controller's
failures, power cycles, and the safe state."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from drivers.errors import (
    InstrumentChangedError,
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    NotConnectedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.idq_gate_generator import IdqGateGenerator, IdqGateGeneratorOptions
from drivers.idq_time_controller import IdqTimeController, IdqTimeControllerOptions
from drivers.interfaces import HealthLevel
from drivers.scpisim import idq_time_controller as sim_module
from drivers.scpisim.idq_time_controller import IdqTimeControllerSim
from tests.drivers.helpers import ExpectedProtocolTransport

IDN = "ID Quantique,ID1000,SN7,2.1"
OPTS = IdqGateGeneratorOptions(gate_period_ps=100_000, gate_width_ps=2_500, gate_delay_ps=500)


@pytest.fixture
def sim() -> Iterator[IdqTimeControllerSim]:
    with IdqTimeControllerSim(chunk_s=0.005) as s:
        yield s


@pytest.fixture
def gate(sim: IdqTimeControllerSim) -> Iterator[IdqGateGenerator]:
    dev = IdqGateGenerator("gate0", sim.endpoint, 0.3, OPTS)
    dev.connect()
    yield dev
    dev.close()


CONNECT = [
    ("*IDN?", IDN),
    ("OUTP1:ENAB OFF", ""),
    ("GEN1:ENAB ON;PNUM 1;TRIG:LINK STAR;ARM:MODE AUTO", ""),
    ("TSCO9:WIND:ENAB OFF;:TSCO9:FIR:LINK GEN1;:TSCO9:OPIN ONLYFIR;OPOU ONLYFIR", ""),
    ("OUTP1:LINK TSCO9;MODE TTL", ""),
    ("GEN1:PPER 100000", ""),
    ("GEN1:PWID 2500", ""),
    ("GEN1:TRIG:DELA 500", ""),
]


def test_pinned_messages_of_connect_settings_and_readbacks() -> None:
    t = ExpectedProtocolTransport(
        [
            *CONNECT,
            ("GEN1:TRIG:DELA 12345", ""),
            ("OUTP1:ENAB ON", ""),
            ("GEN1:PPER?", "100000"),
            ("GEN1:PPER?", "100000"),
            ("GEN1:PWID?", "2500 ps"),  # a unit after the number is accepted
            ("GEN1:TRIG:DELA?", "12345"),
            ("OUTP1:ENAB?", "ON"),
            ("OUTP1:ENAB OFF", ""),
        ]
    )
    dev = IdqGateGenerator("gate0", "ignored", 1.0, OPTS, transport=t)
    t.open()
    dev.connect()
    dev.set_gate_delay_ps(12345)
    dev.set_output_enabled(True)
    assert dev.gate_period_ps() == 100_000 and dev.gate_frequency_hz() == 1e7
    assert dev.gate_width_ps() == 2500 and dev.gate_delay_ps() == 12345
    assert dev.output_enabled() is True
    dev.safe_state()
    t.assert_done()


def test_free_running_generator_is_played_and_not_triggered() -> None:
    opts = IdqGateGeneratorOptions(
        generator=3, combiner=2, output=4, output_level="NIM", trigger_link="NONE"
    )
    t = ExpectedProtocolTransport(
        [
            ("*IDN?", IDN),
            ("OUTP4:ENAB OFF", ""),
            ("GEN3:ENAB ON;PNUM INF;TRIG:LINK NONE;ARM:MODE MANU", ""),
            ("TSCO2:WIND:ENAB OFF;:TSCO2:FIR:LINK GEN3;:TSCO2:OPIN ONLYFIR;OPOU ONLYFIR", ""),
            ("OUTP4:LINK TSCO2;MODE NIM", ""),
            ("GEN3:PLAY", ""),
            ("GEN3:PPER 1000000", ""),
            ("GEN3:PWID 2500", ""),
            ("GEN3:TRIG:DELA 0", ""),
        ]
    )
    dev = IdqGateGenerator("gate0", "ignored", 1.0, opts, transport=t)
    t.open()
    dev.connect()
    t.assert_done()


def test_simulator_keeps_the_blocks_and_routes_the_output(
    sim: IdqTimeControllerSim, gate: IdqGateGenerator
) -> None:
    gen, tsco, out = sim.generators[1], sim.combiners[9], sim.outputs[1]
    assert (gen.enabled, gen.pulse_count, gen.trigger_link, gen.arm_mode) == (
        True,
        1,
        "STAR",
        "AUTO",
    )
    assert (tsco.first_link, tsco.op_in, tsco.op_out, out.link, out.mode) == (
        "GEN1",
        "ONLYFIR",
        "ONLYFIR",
        "TSCO9",
        "TTL",
    )
    assert sim.gate_output(1) is None  # connected with the output idle
    gate.set_output_enabled(True)
    gate.set_gate_period_ps(80_000)
    gate.set_gate_width_ps(4_000)
    gate.set_gate_delay_ps(31_000)
    train = sim.gate_output(1)
    assert train is not None
    assert (train.period_ps, train.width_ps, train.delay_ps, train.trigger) == (
        80_000,
        4_000,
        31_000,
        "STAR",
    )
    assert (gate.gate_period_ps(), gate.gate_width_ps(), gate.gate_delay_ps()) == (
        80_000,
        4_000,
        31_000,
    )
    assert sim.received[-1] == b"GEN1:TRIG:DELA?"
    # the combiner muted, or the generator switched off behind the driver: no gates
    sim.handle("TSCO9:OPOU MUTE")
    assert sim.gate_output(1) is None


def test_simulator_reply_conventions_and_scpi_paths(sim: IdqTimeControllerSim) -> None:
    """Empty reply to a setting, the value to a query, error text otherwise; a command
    after ';' continues the previous one's path, as the lab's driver writes them."""
    assert (
        sim.handle("GEN2:ENAB ON;PNUM 1;PPER 1500;PWID 400;TRIG:DELA 70;LINK GEN3;ARM:MODE AUTO")
        == ""
    )
    g = sim.generators[2]
    assert (g.period_ps, g.width_ps, g.trigger_delay_ps, g.trigger_link, g.arm_mode) == (
        1500,
        400,
        70,
        "GEN3",
        "AUTO",
    )
    assert sim.handle("GEN2:PPER?") == "1500" and sim.handle("GEN2:PNUM INF") == ""
    assert sim.handle("GEN2:PNUM?") == "INF" and sim.handle("GEN2:TRIG:ARM:MODE?") == "AUTO"
    assert sim.handle("GEN2:PPER -5").startswith("Error")
    assert sim.handle("GEN2:TRIG:LINK GEN2").startswith("Error")  # not to itself
    assert sim.handle("GEN9:ENAB ON").startswith("Error")  # GEN1-GEN8
    assert sim.handle("OUTP1:LINK GEN1").startswith("Error")  # outputs take a combiner
    assert sim.handle("TSCO3:WIND:ENAB OFF;BEGI:DELA 0").startswith("Error")  # not modelled
    assert sim.handle("OUTP2:ENAB ON;LINK TSCO5;MODE NIM;PULS OFF;DELA 0;PULS:WIDT 1000") == ""
    assert sim.handle("OUTP2:MODE?") == "NIM" and sim.handle("OUTP2:LINK?") == "TSCO5"


def test_limits_are_refused_before_sending(
    sim: IdqTimeControllerSim, gate: IdqGateGenerator
) -> None:
    before = sim.requests_seen
    for bad in (
        lambda: gate.set_gate_period_ps(5_000),  # below period_range_ps
        lambda: gate.set_gate_period_ps(2_500),  # not above the width
        lambda: gate.set_gate_width_ps(100_000),  # not below the period
        lambda: gate.set_gate_width_ps(10),  # below width_range_ps
        lambda: gate.set_gate_delay_ps(-1),
        lambda: gate.set_gate_delay_ps(float("nan")),  # type: ignore[arg-type]
    ):
        with pytest.raises(OutOfRangeError):
            bad()
    assert sim.requests_seen == before


def test_times_are_rounded_to_the_configured_step(sim: IdqTimeControllerSim) -> None:
    opts = IdqGateGeneratorOptions(time_step_ps=100, gate_delay_ps=0)
    dev = IdqGateGenerator("gate0", sim.endpoint, 0.3, opts)
    dev.connect()
    dev.set_gate_delay_ps(1249)
    assert sim.received[-1] == b"GEN1:TRIG:DELA 1200" and dev.gate_delay_ps() == 1200
    assert dev.health().level is HealthLevel.OK  # the remembered value is the one sent
    dev.close()


def test_options_name_the_key_that_is_wrong() -> None:
    with pytest.raises(ValueError, match="gate_width_ps"):
        IdqGateGeneratorOptions(gate_period_ps=20_000, gate_width_ps=20_000)
    with pytest.raises(ValueError, match="gate_period_ps"):
        IdqGateGeneratorOptions(gate_period_ps=1_000)
    with pytest.raises(ValueError, match="trigger_link"):
        IdqGateGeneratorOptions(trigger_link="INPU9;:OUTP1:ENAB ON")


def test_controller_refusal_fails_connect_and_closes(sim: IdqTimeControllerSim) -> None:
    dev = IdqGateGenerator("gate0", sim.endpoint, 0.3, IdqGateGeneratorOptions(trigger_link="GEN1"))
    with pytest.raises(InstrumentReportedError, match="GEN1"):
        dev.connect()  # the controller refuses a generator triggered by itself
    assert not dev.transport.is_open
    with pytest.raises(NotConnectedError):
        dev.gate_period_ps()


def test_garbled_silent_and_gone_controller_raise_typed_errors(
    sim: IdqTimeControllerSim,
) -> None:
    gate = IdqGateGenerator("gate0", sim.endpoint, 0.1, OPTS)
    gate.connect()
    sim.inject("garble")
    with pytest.raises(ProtocolError):
        gate.gate_period_ps()
    sim.inject("no_reply")
    with pytest.raises(InstrumentTimeoutError):
        gate.set_gate_delay_ps(1000)
    assert gate.gate_delay_ps() == 500  # the lost setting never arrived; next call works
    sim.inject("down")
    for call in (
        gate.gate_period_ps,
        gate.output_enabled,
        lambda: gate.set_output_enabled(True),
        gate.safe_state,
        gate.identify,
    ):
        with pytest.raises(InstrumentError):
            call()
    assert gate.health().level is HealthLevel.FAULT
    gate.close()
    gate.close()


def test_power_cycle_puts_the_gate_back_output_last(
    sim: IdqTimeControllerSim, gate: IdqGateGenerator
) -> None:
    gate.set_gate_delay_ps(41_000)
    gate.set_output_enabled(True)
    sim.power_cycle()
    assert sim.gate_output(1) is None
    sim.received.clear()
    health = gate.health()
    assert health.level is HealthLevel.DEGRADED
    assert any(r.startswith("gate_delay_ps: 0 -> 41000") for r in health.restored)
    assert any(r.startswith("output_enabled: False -> True") for r in health.restored)
    train = sim.gate_output(1)
    assert train is not None and (train.delay_ps, train.period_ps) == (41_000, 100_000)
    sets = [m for m in sim.received if not m.endswith(b"?")]
    assert sets[0] == b"OUTP1:ENAB OFF" and sets[-1] == b"OUTP1:ENAB ON"
    assert gate.health().level is HealthLevel.OK  # reported once


def test_another_controller_at_the_address_is_refused(
    sim: IdqTimeControllerSim, gate: IdqGateGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate.set_output_enabled(True)
    gate.close()
    monkeypatch.setattr(sim_module, "IDN", "ID Quantique,ID1000,OTHER99,2.0.0")
    sim.power_cycle()
    n = len(sim.received)
    with pytest.raises(InstrumentChangedError):
        gate.connect()
    assert all(m == b"*IDN?" for m in sim.received[n:])  # nothing set on the other unit
    assert sim.gate_output(1) is None


def test_safe_state_turns_the_output_off_even_after_close(
    sim: IdqTimeControllerSim, gate: IdqGateGenerator
) -> None:
    gate.set_output_enabled(True)
    gate.safe_state()
    assert sim.gate_output(1) is None and not sim.outputs[1].enabled
    gate.safe_state()  # already safe: no error
    gate.set_output_enabled(True)
    gate.close()
    gate.safe_state()  # a closed driver opens its socket for the one command
    assert not sim.outputs[1].enabled and not gate.transport.is_open
    gate.connect()
    assert gate.health().level is HealthLevel.OK  # the switch-off was no lost setting
    assert not sim.outputs[1].enabled


def test_tagger_and_gate_generator_share_the_controller(sim: IdqTimeControllerSim) -> None:
    """Two drivers, two sockets, one controller: calls from two threads interleave and
    each gets its own replies."""
    tagger = IdqTimeController(
        "tc0", sim.endpoint, 0.5, IdqTimeControllerOptions(dlt_endpoint=sim.dlt_endpoint)
    )
    gate = IdqGateGenerator("gate0", sim.endpoint, 0.5, OPTS)
    tagger.connect()
    gate.connect()
    errors: list[str] = []

    def tag_side() -> None:
        for k in range(100):
            tagger.set_input_delay_ps(1, k)
            if tagger.input_delay_ps(1) != k:
                errors.append(f"tagger read {tagger.input_delay_ps(1)} after {k}")

    def gate_side() -> None:
        for k in range(100):
            gate.set_gate_delay_ps(1000 + k)
            if gate.gate_delay_ps() != 1000 + k:
                errors.append(f"gate read {gate.gate_delay_ps()} after {1000 + k}")

    threads = [threading.Thread(target=tag_side), threading.Thread(target=gate_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert tagger.health().level is HealthLevel.OK and gate.health().level is HealthLevel.OK
    tagger.close()
    gate.close()


def test_a_connect_cut_short_is_set_up_in_full_next_time(sim: IdqTimeControllerSim) -> None:
    """The width is lost on the way during the first connect: the next connect makes the
    whole setup again (not a read-back of what half a setup remembered)."""
    dev = IdqGateGenerator("gate0", sim.endpoint, 0.1, OPTS)
    serve = sim._serve_controller

    def lose_the_width(peer: bytes, message: bytes) -> None:
        if not message.startswith(b"GEN1:PWID "):
            serve(peer, message)

    sim._serve_controller = lose_the_width  # type: ignore[method-assign]
    with pytest.raises(InstrumentTimeoutError):
        dev.connect()
    sim._serve_controller = serve  # type: ignore[method-assign]
    dev.connect()
    assert (sim.generators[1].width_ps, sim.generators[1].trigger_delay_ps) == (2_500, 500)
    assert dev.health().level is HealthLevel.OK
    dev.close()
