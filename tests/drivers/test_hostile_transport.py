"""Robustness run over every registered driver: whatever the transport returns (garbage,
nothing, a dropped connection), no public driver method lets anything but a typed
:class:`InstrumentError` escape, ``health()`` and ``close()`` never raise, and no call
stalls.

The run is driven by the registry (:func:`drivers.registry.known_drivers`) and by each
driver's own signatures: a driver whose constructor takes a ``transport`` of a kind below
is fuzzed through that transport, its public methods called in a seeded random order
with arguments made from their type hints. Byte-level drivers talk to a hostile peer over
their real serial transport (TCP and a pty); SCPI drivers to a hostile message transport.
Drivers with no transport to garble say why in ``NOT_FUZZED`` (or come from the
simulated link, whose instruments are in-process models); a new driver that is neither
fails :func:`test_every_registered_driver_is_fuzzed_or_says_why`.

The fast run (``make test``) uses fixed seeds and a bounded number of calls; the
``system``-marked run draws many more calls from fresh seeds.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from drivers.ascii_spd import AsciiSpd, encode_line
from drivers.errors import InstrumentError, OutOfRangeError, ProtocolError
from drivers.interfaces import TAG_DTYPE, HealthLevel, Instrument, InstrumentHealth, TagBlock
from drivers.oif_itla import OifItlaLaser, Reg, Status, encode_reply
from drivers.registry import known_drivers, resolve
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import Fault, SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from drivers.single_quantum import SingleQuantumSnspd
from drivers.thorlabs_pm100 import ThorlabsPM100
from drivers.timetag_file import TagFileReplayTagger, TagFileWriter
from drivers.transports.base import MessageTransport
from drivers.transports.serial import SerialTransport
from tests.drivers.helpers import ExpectedProtocolTransport
from tests.drivers.hostile import (
    HostileMessageTransport,
    HostilePeer,
    Unsupported,
    call_args,
    public_methods,
    returns_ok,
)

#: Drivers with no byte or message transport the run can make hostile, and where their
#: bad-input behaviour is tested instead.
NOT_FUZZED = {
    "aurea_spd": "vendor library (no byte transport): tests/drivers/test_aurea_spd.py drives "
    "it against a stand-in of the vendor wrapper that fails, raises and returns garbage",
    "qutag": "vendor library (no byte transport): tests/drivers/test_qutag.py drives it "
    "against a stand-in of the vendor wrapper",
    "swabian_time_tagger": "vendor library (no byte transport): tests/drivers/test_swabian.py "
    "drives it against a stand-in of the vendor module, including its failures",
    "timetag_file": "reads a file: test_tag_file_replay_survives_mangled_files below",
    "externally_gated_detector": "a composite of two registered drivers (no transport of "
    "its own); tests/drivers/test_gated_detector.py runs exercise() below on it with its "
    "generator on a hostile message transport and a misbehaving vendor library",
}
#: Drivers of the simulated link: in-process models of the physics, no transport.
IN_PROCESS_MODULES = ("drivers.simlink.",)
#: Drivers that open their own TCP connections to ``resource``: they get the hostile
#: peer's address, and every ``*_port`` option a second hostile peer's port.
TCP_RESOURCE = frozenset({"single_quantum_snspd"})

#: A call on a hostile transport must end within this (timeouts here are 20-50 ms).
MAX_CALL_S = 3.0
#: Transport timeout of the run, and every ``*_s`` option the driver has, as small as
#: its model allows (so retries, pending-operation waits and resyncs stay short).
TIMEOUT_S = 0.03


def transport_kind(cls: type) -> str | None:
    """ "message" or "serial" from the type of the constructor's ``transport`` parameter."""
    hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    hint = hints.get("transport")
    for candidate in typing.get_args(hint) or (hint,):
        if isinstance(candidate, type) and issubclass(candidate, MessageTransport):
            return "message"
        if isinstance(candidate, type) and issubclass(candidate, SerialTransport):
            return "serial"
    return None


def fuzzable() -> dict[str, tuple[type[Instrument], str]]:
    out = {}
    for name, entry in known_drivers().items():
        if entry.import_path.startswith(IN_PROCESS_MODULES) or name in NOT_FUZZED:
            continue
        cls = resolve(name)
        kind = "tcp" if name in TCP_RESOURCE else transport_kind(cls)
        if kind is not None:
            out[name] = (cls, kind)
    return out


def short_options(cls: type[Instrument], port: int | None = None) -> BaseModel | None:
    """The driver's options with every ``*_s`` field at the smallest value it accepts (and
    every ``*_port`` field at ``port``, when given)."""
    model: type[BaseModel] | None = getattr(cls, "Options", None)
    if model is None:
        return None
    values: dict[str, Any] = {}
    for fname, finfo in model.model_fields.items():
        if port is not None and fname.endswith("_port") and finfo.annotation is int:
            values[fname] = port
        if not fname.endswith("_s") or finfo.annotation is not float:
            continue
        for candidate in (0.0, 0.005, 0.02, 0.05, 0.2, 1.0):
            try:
                model.model_validate({fname: candidate})
            except ValidationError:
                continue
            values[fname] = candidate
            break
    return model.model_validate(values)


@dataclass
class Findings:
    calls: int = 0
    typed_errors: int = 0
    problems: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems[:20])
        assert self.calls > 0


def exercise(
    inst: Instrument, reopen: Callable[[], None], rng: random.Random, calls: int
) -> Findings:
    """Call ``calls`` random public methods of ``inst``; what escaped, what stalled."""
    found = Findings()
    methods = public_methods(inst)
    names = sorted(methods)  # close too: a later connect() then runs its setup again
    for _ in range(calls):
        name = rng.choice(names)
        method = methods[name]
        try:
            args = call_args(inst, method, rng)
        except Unsupported:
            continue
        found.calls += 1
        start = time.monotonic()
        where = f"{inst.name}.{name}{tuple(args)!r}"
        try:
            value = method(*args)
        except InstrumentError:
            found.typed_errors += 1
            if name in ("health", "close"):
                found.problems.append(f"{where}: {name}() raised")
        except Exception as exc:
            found.problems.append(f"{where}: {type(exc).__name__}: {exc}")
        else:
            if not returns_ok(method, value):
                found.problems.append(f"{where}: returned {value!r}")
            if name == "health" and not isinstance(value, InstrumentHealth):
                found.problems.append(f"{where}: returned {value!r}")
        elapsed = time.monotonic() - start
        if elapsed > MAX_CALL_S:
            found.problems.append(f"{where}: took {elapsed:.1f} s")
        try:
            reopen()  # catches the typed errors itself
        except Exception as exc:
            found.problems.append(f"{inst.name} reopen/connect: {type(exc).__name__}: {exc}")
    try:
        inst.close()
        inst.close()
    except Exception as exc:
        found.problems.append(f"{inst.name}.close(): {type(exc).__name__}: {exc}")
    health = inst.health()
    if health.level is not HealthLevel.FAULT:
        found.problems.append(f"{inst.name}.health() after close: {health}")
    return found


def _reopener(transport: Any) -> Callable[[], None]:
    """Open the transport again when a failed connect() closed it (so that the other
    methods keep reaching the hostile peer)."""

    def reopen() -> None:
        if not transport.is_open:
            try:
                transport.open()
            except InstrumentError:
                pass

    return reopen


def run_message_driver(name: str, seed: int, calls: int) -> Findings:
    cls, _ = fuzzable()[name]
    transport = HostileMessageTransport("dut", seed)
    inst = cls("dut", "hostile", TIMEOUT_S, options=short_options(cls), transport=transport)  # type: ignore[call-arg]
    transport.open()
    return exercise(inst, _reopener(transport), random.Random(seed), calls)


def run_serial_driver(name: str, mode: str, seed: int, calls: int) -> Findings:
    cls, _ = fuzzable()[name]
    peer = HostilePeer(seed)
    link = os.path.join(tempfile.mkdtemp(prefix="hostile"), "tty")
    srv = SimServer(peer, mode=mode, link_path=link).start()
    peer.drop = lambda: srv.inject(Fault.DROP)
    try:
        inst = cls("dut", srv.url, TIMEOUT_S, options=short_options(cls))  # type: ignore[call-arg]
        transport = inst.transport  # type: ignore[attr-defined]
        transport.open()
        return exercise(inst, _reopener(transport), random.Random(seed), calls)
    finally:
        srv.stop()


def run_tcp_driver(name: str, seed: int, calls: int) -> Findings:
    cls, _ = fuzzable()[name]
    peers = [HostilePeer(seed), HostilePeer(seed + 1)]
    servers = [SimServer(peer, mode="tcp").start() for peer in peers]
    for peer, srv in zip(peers, servers, strict=True):
        peer.drop = lambda srv=srv: srv.inject(Fault.DROP)  # type: ignore[misc]
    try:
        resource = f"tcp://127.0.0.1:{servers[0].port}"
        opts = short_options(cls, port=servers[1].port)
        inst = cls("dut", resource, TIMEOUT_S, options=opts)  # type: ignore[call-arg]

        def reconnect() -> None:  # no transport to reopen: connect() (a no-op when up)
            try:
                inst.connect()
            except InstrumentError:
                pass

        return exercise(inst, reconnect, random.Random(seed), calls)
    finally:
        for srv in servers:
            srv.stop()


# --- the registry is covered -------------------------------------------------------------


def test_every_registered_driver_is_fuzzed_or_says_why() -> None:
    covered = fuzzable()
    unexplained = [
        name
        for name, entry in known_drivers().items()
        if name not in covered
        and name not in NOT_FUZZED
        and not entry.import_path.startswith(IN_PROCESS_MODULES)
    ]
    assert not unexplained, (
        f"drivers with no transport the robustness run can make hostile: {unexplained}; "
        "take a `transport: MessageTransport | SerialTransport | None` constructor "
        "argument, or add the driver to NOT_FUZZED with where its bad input is tested"
    )
    assert {"message", "serial", "tcp"} <= {kind for _, kind in covered.values()}


# --- fast run (make test) ----------------------------------------------------------------

MESSAGE_DRIVERS = sorted(n for n, (_, k) in fuzzable().items() if k == "message")
SERIAL_DRIVERS = sorted(n for n, (_, k) in fuzzable().items() if k == "serial")
TCP_DRIVERS = sorted(n for n, (_, k) in fuzzable().items() if k == "tcp")


@pytest.mark.parametrize("driver", MESSAGE_DRIVERS)
def test_scpi_driver_lets_only_typed_errors_escape(driver: str) -> None:
    found = run_message_driver(driver, seed=20261207, calls=300)
    found.check()
    assert found.typed_errors > 0  # the transport was hostile


#: Calls per serial driver and link: pyserial's socket:// close sleeps 0.3 s, and the
#: hostile peer drops the connection often, so TCP gets fewer calls than the pty.
SERIAL_CALLS = {"pty": 60, "tcp": 12}


@pytest.mark.parametrize("mode", ["tcp", "pty"])
@pytest.mark.parametrize("driver", SERIAL_DRIVERS)
def test_serial_driver_lets_only_typed_errors_escape(driver: str, mode: str) -> None:
    found = run_serial_driver(driver, mode, seed=7, calls=SERIAL_CALLS[mode])
    found.check()
    assert found.typed_errors > 0


@pytest.mark.parametrize("driver", TCP_DRIVERS)
def test_tcp_driver_lets_only_typed_errors_escape(driver: str) -> None:
    found = run_tcp_driver(driver, seed=3, calls=60)
    found.check()
    assert found.typed_errors > 0


# --- tag files ---------------------------------------------------------------------------


@pytest.fixture
def tag_file(tmp_path: Path) -> Iterator[bytes]:
    path = tmp_path / "good.qkdtags"
    with TagFileWriter(path, [1, 2]) as w:
        for k in range(3):
            tags = np.zeros(4, dtype=TAG_DTYPE)
            tags["channel"] = [1, 2, 1, 2]
            tags["time_ps"] = k * 1000 + np.arange(4) * 100
            w.write_block(TagBlock(tags, start_ps=k * 1000, stop_ps=(k + 1) * 1000))
    yield path.read_bytes()


def _mangle(good: bytes, rng: random.Random) -> bytes:
    data = bytearray(good)
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(data[: rng.randrange(len(data))])
    if kind == 1:
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # a header that parses as JSON but is not what the reader expects
        header = rng.choice(
            [b"[]", b'{"version": 1}', b'{"version": 1, "channels": "ab"}', b"\xff\xfe", b"{"]
        )
        return good[:8] + len(header).to_bytes(4, "little") + header + good[-60:]
    return good[:12] + rng.randbytes(rng.randrange(40))


def test_tag_file_replay_survives_mangled_files(tag_file: bytes, tmp_path: Path) -> None:
    rng = random.Random(11)
    problems = []
    for case in range(120):
        path = tmp_path / f"bad{case}.qkdtags"
        path.write_bytes(_mangle(tag_file, rng))
        inst = TagFileReplayTagger("dut", str(path))
        try:
            inst.connect()
        except InstrumentError:
            continue
        except Exception as exc:
            problems.append(f"case {case}: connect: {type(exc).__name__}: {exc}")
            continue
        found = exercise(inst, lambda: None, random.Random(case), 15)
        problems += [f"case {case}: {p}" for p in found.problems]
    assert not problems, "\n".join(problems[:20])


# --- long randomised run (make test-system) ---------------------------------------------


@pytest.mark.system
@pytest.mark.parametrize("seed", range(3))
def test_every_driver_under_a_long_hostile_run(seed: int) -> None:
    base = random.SystemRandom().randrange(1 << 30) + seed
    problems = []
    for name in MESSAGE_DRIVERS:
        problems += run_message_driver(name, base, 3000).problems
    for name in SERIAL_DRIVERS:
        for mode, calls in (("pty", 600), ("tcp", 120)):
            problems += run_serial_driver(name, mode, base, calls).problems
    for name in TCP_DRIVERS:
        problems += run_tcp_driver(name, base, 600).problems
    assert not problems, f"seed {base}:\n" + "\n".join(problems[:30])


def test_the_run_sees_a_new_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver registered later is picked up from its signature, without editing this."""
    from drivers import registry

    monkeypatch.setitem(
        registry.DRIVERS,
        "another_spd",
        registry.DriverEntry("drivers.ascii_spd:AsciiSpd", "SinglePhotonDetector", "test"),
    )
    assert fuzzable()["another_spd"][1] == "serial"
    assert "transport" in inspect.signature(resolve("another_spd")).parameters


# --- what the run found, one test each ----------------------------------------------


class _SpdWithLimits(SpdSimulator):
    def __init__(self, limits_reply: str) -> None:
        super().__init__()
        self.limits_reply = limits_reply

    def _handle(self, line: bytes) -> bytes:
        if line.startswith(b"LIM?"):
            return encode_line(f"OK {self.limits_reply}")
        return super()._handle(line)


@pytest.mark.parametrize(
    "reply",
    [
        "EFF=.:e DEAD=+:- DELAY=0:1 THR=0:1",  # float('.'): ValueError escaped connect()
        "EFF=1:nan DEAD=0:1 DELAY=0:1 THR=0:1",  # every setting would be refused later
        "EFF=30:5 DEAD=0:1 DELAY=0:1 THR=0:1",
        "EFF=5:30 DEAD=0:1 DELAY=0:1 THR=0:1e999",
    ],
)
def test_spd_limits_that_are_not_numbers_fail_connect_with_a_protocol_error(reply: str) -> None:
    link = os.path.join(tempfile.mkdtemp(prefix="spd"), "tty")
    with SimServer(_SpdWithLimits(reply), mode="pty", link_path=link) as srv:
        det = AsciiSpd("spd0", srv.url, 0.5)
        with pytest.raises(ProtocolError) as info:
            det.connect()
        assert info.value.command == "LIM?" and reply in info.value.reason
        assert not det.transport.is_open


class _ItlaWithHugeString(ItlaSimulator):
    """Announces a 65535-byte manufacturer string and answers every AEA-EAR read."""

    def _read(self, register: int) -> bytes:
        if register == Reg.MFGR:
            return encode_reply(Status.AEA, register, 0xFFFF)
        if register == Reg.AEA_EAR:
            return encode_reply(Status.OK, register, 0x4141)
        return super()._read(register)


def test_itla_corrupted_string_length_is_refused_at_once() -> None:
    link = os.path.join(tempfile.mkdtemp(prefix="itla"), "tty")
    with SimServer(_ItlaWithHugeString(), mode="pty", link_path=link) as srv:
        laser = OifItlaLaser("itla", srv.url, 0.5)
        laser.connect()
        start = time.monotonic()
        with pytest.raises(ProtocolError) as info:
            laser.identify()  # was 32768 exchanges (minutes at 9600 baud)
        assert time.monotonic() - start < 1.0
        assert info.value.command == "read MFGR" and "65535 bytes" in info.value.reason
        assert srv.requests_seen < 20
        laser.close()


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"QKDTAGS1\x05\x00", "ends inside the header length"),
        (b"QKDTAGS1\xff\xff\xff\xff", "header length"),  # was MemoryError
        (b"QKDTAGS1\x10\x00\x00\x00{", "ends inside"),  # was JSONDecodeError
        (b"QKDTAGS1\x02\x00\x00\x00\xff\xfe", "not UTF-8 JSON"),  # was UnicodeDecodeError
        (b"QKDTAGS1\x02\x00\x00\x00[]", "not an object"),  # was AttributeError
        (b"QKDTAGS1\x20\x00\x00\x00" + b'{"version": 1, "channels": "ab"}', "not a list of"),
    ],
)
def test_tag_file_with_a_bad_header_is_a_protocol_error(
    raw: bytes, says: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.qkdtags"
    path.write_bytes(raw)
    with pytest.raises(ProtocolError) as info:
        TagFileReplayTagger("dut", str(path)).connect()
    assert says in info.value.reason


def test_tag_file_block_count_past_the_end_is_a_cut_file(tag_file: bytes, tmp_path: Path) -> None:
    header_end = tag_file.index(b"}}") + 2
    huge = (1 << 62).to_bytes(8, "little") + bytes(33)  # was MemoryError or OverflowError
    path = tmp_path / "cut.qkdtags"
    path.write_bytes(tag_file + huge)
    tagger = TagFileReplayTagger("dut", str(path))
    tagger.connect()
    assert tagger.identify().endswith("3 blocks,v1")
    path.write_bytes(tag_file[:header_end] + huge)
    tagger = TagFileReplayTagger("dut2", str(path))
    tagger.connect()
    assert "0 blocks" in tagger.identify()


def test_tag_file_read_block_timeout_below_zero_waits_not_at_all(
    tag_file: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "good.qkdtags"
    path.write_bytes(tag_file)
    tagger = TagFileReplayTagger("dut", str(path))
    tagger.connect()
    assert tagger.read_block(-1.0) is None  # not streaming: was ValueError from sleep()
    tagger.start_stream()
    block = tagger.read_block(-1.0)
    assert block is not None and len(block) == 4
    with pytest.raises(OutOfRangeError):
        tagger.read_block(math.nan)


@pytest.mark.parametrize("reply", ["1e999", "nan", "2.5", "0"])
def test_pm100_averaging_that_is_not_a_count_is_a_protocol_error(reply: str) -> None:
    ok = '0,"No error"'
    t = ExpectedProtocolTransport(
        [
            ("*IDN?", "Thorlabs,PM100USB,P1,1.7.0"),
            ("SYST:ERR?", ok),
            ("SENS:POW:UNIT W", None),
            ("SYST:ERR?", ok),
            ("SENS:AVER:COUN?", reply),  # 1e999: OverflowError from int(inf) escaped
        ]
    )
    meter = ThorlabsPM100("pm", "unused", transport=t)
    meter.connect()
    with pytest.raises(ProtocolError) as info:
        meter.averaging()
    assert info.value.command == "SENS:AVER:COUN?"
    t.assert_done()


class _DeepJson(HostilePeer):
    """A controller whose every answer nests deeper than the JSON parser's recursion."""

    def feed(self, data: bytes) -> list[bytes]:
        return [b"[" * 100_000 + b"\x17"]


def test_single_quantum_json_nested_too_deep_is_a_protocol_error() -> None:
    with SimServer(_DeepJson(0), mode="tcp") as srv:
        det = SingleQuantumSnspd("snspd", f"tcp://127.0.0.1:{srv.port}", 1.0)
        with pytest.raises(ProtocolError) as info:
            det.connect()  # was RecursionError from the JSON decoder
        assert "not JSON" in info.value.reason
        det.close()
