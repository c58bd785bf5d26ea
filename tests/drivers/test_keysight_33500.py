"""Keysight 33500B/33600A driver against its pyvisa-sim definition, with a command log.

The log comes from a transport that wraps the real VISA transport (pyvisa-sim) and records
every message, so the tests see exactly what the driver sends. The output model below
replays that log to check the level on channel 1 after every single command.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from drivers.errors import OutOfRangeError
from drivers.interfaces import IntensityClass
from drivers.keysight_33500 import (
    Awg33500Options,
    Keysight33500Encoder,
    Keysight33500IntensityModulator,
)
from drivers.transports.base import MessageTransport
from drivers.transports.visa import VisaTransport
from tests.drivers.helpers import sim_copy

IM_RESOURCE = "USB0::0x0957::0x2C07::MY00000003::INSTR"
ENC_RESOURCE = "USB0::0x0957::0x2C07::MY00000004::INSTR"

#: Settings one level change may send (the driver before this test sent 7).
MAX_SETTINGS_PER_LEVEL_CHANGE = 5


class RecordingTransport(MessageTransport):
    """Wraps a transport and logs ("W"|"Q", message); can answer ``*IDN?`` as another model."""

    def __init__(self, inner: MessageTransport, identity: str | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.identity = identity
        self.log: list[tuple[str, str]] = []

    @property
    def is_open(self) -> bool:
        return self.inner.is_open

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def write(self, command: str) -> None:
        self.log.append(("W", command))
        self.inner.write(command)

    def query(self, command: str) -> str:
        self.log.append(("Q", command))
        if command == "*IDN?" and self.identity is not None:
            return self.identity
        return self.inner.query(command)

    def writes(self, since: int = 0) -> list[str]:
        return [m for kind, m in self.log[since:] if kind == "W"]


def _recorder(tmp_path: Path, resource: str, identity: str | None = None) -> RecordingTransport:
    lib = sim_copy(tmp_path, "keysight_33500.yaml")
    return RecordingTransport(VisaTransport("awg", resource, visa_library=lib), identity)


def _im(
    tmp_path: Path, identity: str | None = None, **options: object
) -> tuple[Keysight33500IntensityModulator, RecordingTransport]:
    t = _recorder(tmp_path, IM_RESOURCE, identity)
    im = Keysight33500IntensityModulator(
        "im",
        IM_RESOURCE,
        options=Awg33500Options(**options),
        transport=t,  # type: ignore[arg-type]
    )
    return im, t


def _is_infinite_load(reply: str) -> bool:
    """The instrument answers 9.9E+37 for INF; the simulator echoes the word."""
    return reply.strip().upper() == "INF" or float(reply) >= 9.9e37


def _arb_points(command: str) -> list[float]:
    return [float(x) for x in command.split(",")[1:]]


class Channel1Model:
    """What channel 1 outputs after each command, from the command log alone.

    Understands both ways of setting the scale: ``VOLT``/``VOLT:OFFS`` (amplitude and
    offset) and ``VOLT:HIGH``/``VOLT:LOW`` (levels of the +1 and -1 points).
    """

    def __init__(self) -> None:
        self.arbs: dict[str, list[float]] = {}
        self.active: list[float] = []
        self.high = 0.05
        self.low = -0.05

    def apply(self, command: str) -> None:
        head, _, arg = command.partition(" ")
        if head == "SOUR1:DATA:ARB":
            name = arg.split(",")[0]
            self.arbs[name] = _arb_points(command)
        elif head == "SOUR1:FUNC:ARB":
            self.active = self.arbs[arg]
        elif head == "SOUR1:DATA:VOL:CLE":
            self.arbs.clear()
        elif head == "SOUR1:VOLT:HIGH":
            self.high = float(arg)
        elif head == "SOUR1:VOLT:LOW":
            self.low = float(arg)
        elif head == "SOUR1:VOLT":
            centre = (self.high + self.low) / 2
            self.high, self.low = centre + float(arg) / 2, centre - float(arg) / 2
        elif head == "SOUR1:VOLT:OFFS":
            half = (self.high - self.low) / 2
            self.high, self.low = float(arg) + half, float(arg) - half

    def output_v(self) -> list[float]:
        return [self.low + (p + 1) / 2 * (self.high - self.low) for p in self.active]


# --- OUTP:LOAD -------------------------------------------------------------------


def test_load_is_set_to_infinity_on_both_channels_and_read_back(tmp_path: Path) -> None:
    im, t = _im(tmp_path)
    im.connect()
    assert "OUTP1:LOAD INF" in t.writes() and "OUTP2:LOAD INF" in t.writes()
    assert ("Q", "OUTP1:LOAD?") in t.log and ("Q", "OUTP2:LOAD?") in t.log  # read back
    assert _is_infinite_load(t.query("OUTP1:LOAD?"))
    assert _is_infinite_load(t.query("OUTP2:LOAD?"))
    im.close()


def test_load_is_configurable(tmp_path: Path) -> None:
    im, t = _im(tmp_path, drive_load=50.0)
    im.connect()
    assert t.query("OUTP1:LOAD?") == "50" and _is_infinite_load(t.query("OUTP2:LOAD?"))
    im.close()
    with pytest.raises(OutOfRangeError, match=r"im: options\.drive_load: load 20000"):
        Keysight33500IntensityModulator(
            "im", IM_RESOURCE, options=Awg33500Options(drive_load=20_000.0)
        )


def test_load_reply_forms() -> None:
    from drivers.keysight_33500 import parse_load_reply

    assert parse_load_reply("+9.900000000000000E+37") == "INF"
    assert parse_load_reply("INF") == "INF"
    assert parse_load_reply("+5.000000000000000E+01") == 50.0


# --- sample rate and triggering ----------------------------------------------------


def test_sample_rate_trigger_and_burst_are_configured(tmp_path: Path) -> None:
    im, t = _im(tmp_path)  # defaults: one level per slot at 1 MHz, 4 samples per level
    im.connect()
    assert float(t.query("SOUR1:FUNC:ARB:SRAT?")) == pytest.approx(4e6)
    assert t.query("TRIG1:SOUR?") == "EXT"
    assert t.query("TRIG1:SLOP?") == "POS"
    assert t.query("SOUR1:BURS:MODE?") == "TRIG"
    assert t.query("SOUR1:BURS:NCYC?") == "1"
    assert t.query("SOUR1:BURS:STAT?") == "1"
    im.close()


def test_sample_rate_follows_the_slot_rate(tmp_path: Path) -> None:
    im, t = _im(tmp_path, slot_rate_hz=2e6, samples_per_level=4)
    im.connect()
    assert float(t.query("SOUR1:FUNC:ARB:SRAT?")) == pytest.approx(8e6)  # 2 MHz x 4
    assert im.arb_sample_rate_sa_s() == pytest.approx(8e6)
    im.close()


def test_sample_rate_beyond_the_model_is_refused_before_sending(tmp_path: Path) -> None:
    im, t = _im(tmp_path, slot_rate_hz=100e6, samples_per_level=4)  # 400 MSa/s > 250
    with pytest.raises(OutOfRangeError) as info:
        im.connect()
    assert info.value.instrument == "im" and info.value.command == "SOUR1:FUNC:ARB:SRAT"
    assert t.writes() == []


# --- minimum arbitrary waveform length --------------------------------------------


def test_short_table_is_padded_to_the_33500b_minimum_keeping_the_timing(tmp_path: Path) -> None:
    im, t = _im(tmp_path, samples_per_level=1, initial_levels_v=[2.0, 0.4, 0.0])
    im.connect()
    uploads = [c for c in t.writes() if c.startswith("SOUR1:DATA:ARB ")]
    points = _arb_points(uploads[-1])
    assert len(points) >= 8  # 3 classes x 1 sample would be 3
    per_level = len(points) // 3
    assert len(points) == 3 * per_level
    assert all(len(set(points[i * per_level : (i + 1) * per_level])) == 1 for i in range(3))
    # each level still lasts one slot: the sample rate grew with the repetition
    assert float(t.query("SOUR1:FUNC:ARB:SRAT?")) == pytest.approx(1e6 * per_level)
    assert im.level_v(IntensityClass.DECOY) == pytest.approx(0.4, abs=1e-5)
    im.close()


def test_33600a_needs_32_points(tmp_path: Path) -> None:
    im, t = _im(tmp_path, identity="Keysight Technologies,33622A,MY1,A.02.02")
    im.connect()  # the default 3 x 4 = 12 points would be too short on a 33600A
    upload = [c for c in t.writes() if c.startswith("SOUR1:DATA:ARB ")][-1]
    assert len(_arb_points(upload)) >= 32
    im.close()


def test_short_table_is_refused_with_a_typed_error_when_padding_is_off(tmp_path: Path) -> None:
    im, t = _im(tmp_path, samples_per_level=2, pad_short_waveforms=False)
    with pytest.raises(OutOfRangeError) as info:
        im.connect()
    assert info.value.instrument == "im" and info.value.command == "SOUR1:DATA:ARB"
    assert "6 points" in info.value.reason and "[8," in info.value.reason
    assert not any(c.startswith("SOUR1:DATA:ARB") for c in t.writes())


# --- level changes -------------------------------------------------------------------


def test_level_change_is_few_commands_and_never_leaves_the_drive_range(tmp_path: Path) -> None:
    drive_range = (0.0, 3.0)
    im, t = _im(tmp_path, drive_range_v=drive_range, initial_levels_v=[2.5, 1.0, 0.2])
    im.connect()
    model = Channel1Model()
    for command in t.writes():
        model.apply(command)
    changes = [
        (IntensityClass.DECOY, 1.5),  # interior level: points only
        (IntensityClass.SIGNAL, 2.9),  # the highest level moves up
        (IntensityClass.VACUUM, 0.0),  # the lowest level moves down
        (IntensityClass.SIGNAL, 1.8),  # the highest level moves down
    ]
    for cls, volts in changes:
        old = dict(im.levels_v())
        mark = len(t.log)
        im.set_level_v(cls, volts)
        sent = t.writes(mark)
        new = {**old, int(cls): volts}
        lo = min(*old.values(), *new.values()) - 1e-5
        hi = max(*old.values(), *new.values()) + 1e-5
        for command in sent:
            model.apply(command)
            out = model.output_v()
            assert all(drive_range[0] - 1e-5 <= v <= drive_range[1] + 1e-5 for v in out), (
                command,
                sorted(set(out)),
            )
            assert all(lo <= v <= hi for v in out), (command, sorted(set(out)))
        assert len(sent) <= MAX_SETTINGS_PER_LEVEL_CHANGE, sent
        assert not any(c.startswith(("OUTP", "SOUR1:DATA:VOL:CLE")) for c in sent), sent
        assert model.output_v()[:: im._samples_per_level] == pytest.approx(
            [new[c] for c in range(3)], abs=1e-5
        )
        assert im.level_v(cls) == pytest.approx(volts, abs=1e-5)
    im.close()


def test_volatile_memory_reload_turns_only_channel_1_off_and_back_on(tmp_path: Path) -> None:
    t = _recorder(tmp_path, ENC_RESOURCE)
    enc = Keysight33500Encoder("enc", ENC_RESOURCE, transport=t)
    enc.connect()
    enc.set_output(True)
    for i in range(40):
        mark = len(t.log)
        enc.set_drive_v(enc.LEVEL_ENUM(i % 4), 0.01 * i)  # type: ignore[arg-type]
        sent = t.writes(mark)
        if "SOUR1:DATA:VOL:CLE" in sent:
            assert sent[0] == "OUTP1 0" and sent[-1] == "OUTP1 1", sent
            assert "OUTP2 0" not in sent
        else:
            assert len(sent) <= MAX_SETTINGS_PER_LEVEL_CHANGE
    assert sum("SOUR1:DATA:VOL:CLE" in c for c in t.writes()) == 2  # connect + one reload
    assert enc.output_on()
    enc.close()


def test_high_low_order_keeps_every_intermediate_inside_both_ranges() -> None:
    from drivers.keysight_33500 import high_low_order

    values = [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0]
    for oh, ol, nh, nl in itertools.product(values, repeat=4):
        if not (oh > ol and nh > nl):
            continue
        high, low = oh, ol
        for which in high_low_order(oh, ol, nh, nl):
            high, low = (nh, low) if which == "HIGH" else (high, nl)
            assert high > low
            assert min(ol, nl) <= low and high <= max(oh, nh)
        assert (high, low) == (nh, nl)
