"""Hostile instrument peers for the driver robustness run, and calling a driver's public
methods with arguments made from their signatures.

* :class:`HostilePeer`: a byte-level "instrument" hosted by :class:`SimServer` on TCP or a
  pty (so the driver's real :class:`SerialTransport` is used): each request is answered
  with random bytes, a random line, an echo of the request with bits flipped, nothing
  (timeout), or the connection dropped, chosen by a seeded generator.
* :class:`HostileMessageTransport`: the same for SCPI drivers at the message level (a
  garbage reply string, or the typed error the VISA transport raises on a timeout or a
  lost session).
* :func:`call_args`: arguments for a public driver method from its type hints; a number
  named ``<quantity>_<unit>`` is drawn inside the driver's ``<quantity>_range_<unit>``
  when it has one, so that range checks let the call reach the transport.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import json
import math
import random
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from drivers.ascii_spd import checksum as ascii_checksum
from drivers.errors import ConnectionLostError, InstrumentTimeoutError
from drivers.oif_itla import FRAME_LEN, Status, bip4, encode_reply
from drivers.serialsim.server import ProtocolHandler
from drivers.transports.base import InProcessTransport
from drivers.transports.visa import SIM_DIR

#: Reply texts that look like numbers or states but are not what a driver expects.
TRICKY_TEXT = [
    "",
    " ",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "+1.0E+400",
    "0x10",
    "1,2",
    "ON",
    "OFF",
    "2",
    "-1",
    "+0",
    '+0,"No error"',
    '-113,"Undefined header"',
    "ARMED",
    "OK",
    "OK nan",
    "ERR",
    "\u00e9\u00e8",
    "9" * 400,
]


_NMEA = re.compile(rb"^([\x20-\x29\x2b-\x7e]*)\*([0-9A-F]{2})\r?\n$")
#: Replies of the SPD line protocol with values a driver must not trust.
_SPD_TEXT = [
    "EFF=1:nan DEAD=0:1 DELAY=0:1 THR=0:1",
    "EFF=5:1 DEAD=0:1e999 DELAY=0:1 THR=0:1",
    "EFF=5:30 DEAD=1:2",
    "EFF=.:e DEAD=+:- DELAY=0:1 THR=0:1",
    "LATCHED",
    "DISARMED",
    "1e400",
    "QKDNODE-SIM,SPD-ASCII-1,SN1,1.0",
]


#: Labels of JSON label protocols (Single Quantum's controller), and values a driver must
#: check before it uses them.
_JSON_LABELS = [
    "NumberOfDetectors",
    "BiasCurrent",
    "TriggerLevel",
    "DetectorEnable",
    "InptMeasurementPeriod",
    "BiasVoltage",
    "temperature_long_memory",
    "SomeError",
]
_JSON_VALUES: list[Any] = [
    1,
    4,
    -3,
    True,
    None,
    "x",
    [],
    [1.0, 2.0, 3.0, 4.0],
    [1.0, "x"],
    {"value": 2},
    {"T": []},
    {"T": ["a"]},
    {"T": [4.2]},
    float("inf"),
]


_EPC = re.compile(rb"^(?:V\?|M\?|MDC|MAC|V[1-4],[+-]?\d+)\r\n$")


def _epc_reply(rng: random.Random, request: bytes) -> bytes:
    """OZ Optics EPC framing (text lines closed by ``Done``) around nonsense: voltage
    reports with channels missing, repeated or out of range, modes that are not modes,
    refusals, an echo, or lines that never reach ``Done``."""
    kind = rng.randrange(6)
    if kind == 0:
        chans = [rng.choice([1, 2, 3, 4, 5, 9]) for _ in range(rng.choice([3, 4, 4, 5]))]
        values = [rng.choice(["+0", "-5000", "+99999", "nan", "+", "1e3", "+2500"]) for _ in chans]
        body = "Voltage(mV): " + " ".join(f"CH{c} {v}" for c, v in zip(chans, values, strict=True))
    elif kind == 1:
        body = "Work Mode: " + rng.choice(["DC", "AC(Sine)", "XC", "", "dc", "AC"])
    elif kind == 2:
        return b"Error!\r\n"
    elif kind == 3:
        return b"".join(rng.choice(TRICKY_TEXT).encode("utf-8") + b"\r\n" for _ in range(8))
    else:
        body = rng.choice(TRICKY_TEXT)
    reply = body.encode("utf-8", errors="replace") + b"\r\nDone\r\n"
    return request + reply if rng.random() < 0.2 else reply


def _json_reply(rng: random.Random) -> bytes:
    """One or more label messages each ended by ETB (0x17), or something that is not."""
    kind = rng.randrange(6)
    if kind == 0:
        return b"[" * 100_000 + b"\x17"  # nesting deeper than any parser's recursion
    if kind == 1:
        return rng.randbytes(rng.randrange(1, 20)) + b"\x17"
    messages = []
    for _ in range(rng.randrange(1, 4)):
        label = rng.choice(_JSON_LABELS)
        value = rng.choice(_JSON_VALUES)
        if rng.random() < 0.5:
            value = {"value": value}
        messages.append(json.dumps({"label": label, "value": value}).encode() + b"\x17")
    return b"".join(messages)


class HostilePeer(ProtocolHandler):
    """Answers every request with something hostile (see the module)."""

    def __init__(self, seed: int, p_silent: float = 0.15, p_drop: float = 0.1) -> None:
        self.rng = random.Random(seed)
        self.p_silent = p_silent
        self.p_drop = p_drop
        #: set by the test: the server's fault queue decides a drop
        self.drop: Callable[[], None] | None = None

    def feed(self, data: bytes) -> list[bytes]:
        r = self.rng.random()
        if r < self.p_silent:
            return []
        if r < self.p_silent + self.p_drop and self.drop is not None:
            self.drop()
            return [b"x"]  # the server drops the connection instead of sending it
        return [self._reply(data)]

    def _reply(self, request: bytes) -> bytes:
        rng = self.rng
        framed = self._framed(request)
        if framed is not None and rng.random() < 0.5:
            return framed
        kind = rng.randrange(5)
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 16))
        if kind == 1:
            return rng.randbytes(rng.randrange(0, 12)) + b"\n"
        if kind == 2:
            text = rng.choice(TRICKY_TEXT)
            return text.encode("utf-8") + rng.choice([b"\n", b"\r\n", b"*00\n", b""])
        if kind == 3 and request:
            echo = bytearray(request)
            echo[rng.randrange(len(echo))] ^= 1 << rng.randrange(8)
            return bytes(echo)
        return request

    def _framed(self, request: bytes) -> bytes | None:
        """A reply that passes the framing and checksum of the request's protocol, with
        a meaningless content (so the driver's parsing behind the framing is reached):
        NMEA-style ``payload*CS`` lines, OIF-ITLA frames for the register asked, and
        OZ Optics EPC replies closed by ``Done``."""
        rng = self.rng
        line = _NMEA.match(request)
        if line is not None and int(line.group(2), 16) == ascii_checksum(line.group(1)):
            prefix = rng.choice(["OK ", "OK ", "OK ", "ERR ", "OK", ""])
            payload = prefix + rng.choice(TRICKY_TEXT + _SPD_TEXT * 3)
            raw = payload.encode("ascii", errors="replace")
            return raw + f"*{ascii_checksum(raw):02X}\n".encode()
        if request.lstrip().startswith(b"{"):
            return _json_reply(rng)
        if _EPC.match(request):
            return _epc_reply(rng, request)
        if len(request) == FRAME_LEN and request[0] >> 4 == bip4(request):
            register = request[1] if rng.random() < 0.9 else rng.randrange(256)
            return encode_reply(
                Status(rng.randrange(4)), register, rng.randrange(1 << 16), rng.random() < 0.05
            )
        return None

    def reset_framing(self) -> None:
        pass

    def garble(self, reply: bytes) -> bytes:
        return reply

    def corrupt_checksum(self, reply: bytes) -> bytes:
        return reply


class HostileMessageTransport(InProcessTransport):
    """A message transport whose instrument answers garbage, times out or is lost."""

    def __init__(self, instrument: str, seed: int, p_fail: float = 0.3) -> None:
        super().__init__()
        self.instrument = instrument
        self.rng = random.Random(seed)
        self.p_fail = p_fail
        self.identities = shipped_identities()

    def _maybe_fail(self, command: str) -> None:
        if not self._open:
            from drivers.errors import NotConnectedError

            raise NotConnectedError(self.instrument, command, "not connected")
        self.reopen_if_dropped()
        if self.rng.random() < self.p_fail:
            if self.rng.random() < 0.5:
                raise InstrumentTimeoutError(self.instrument, command, "no reply (hostile)")
            raise ConnectionLostError(self.instrument, command, "session lost (hostile)")

    def write(self, command: str) -> None:
        self._maybe_fail(command)

    def query(self, command: str) -> str:
        self._maybe_fail(command)
        rng = self.rng
        if command == "*IDN?" and rng.random() < 0.7:
            return rng.choice(self.identities)
        if rng.random() < 0.5:
            return rng.choice(TRICKY_TEXT)
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 12)))


def shipped_identities() -> list[str]:
    """The ``*IDN?`` answers of the shipped pyvisa-sim definitions: a hostile instrument
    that sometimes names a real model lets connect get past its identity check."""
    found = []
    for path in sorted(SIM_DIR.glob("*.yaml")):
        lines = path.read_text().splitlines()
        for here, nxt in itertools.pairwise(lines):
            if '"*IDN?"' in here and "r:" in nxt:
                found.append(nxt.split("r:", 1)[1].strip().strip('"'))
    return found


# --- calling public methods --------------------------------------------------------

INT_POOL = [0, 1, 2, 3, 0x31, 255]
FLOAT_POOL = [0.0, 1.0, -1.0, 0.5, 10.0, 1550.0]


class Unsupported(Exception):
    """A parameter type the run cannot make a value for."""


def public_methods(inst: object) -> dict[str, Callable[..., Any]]:
    """Public methods of ``inst``'s class (not properties, not the pydantic model)."""
    out = {}
    for name, member in inspect.getmembers(type(inst)):
        if name.startswith("_") or not inspect.isfunction(member) or name == "Options":
            continue
        out[name] = getattr(inst, name)
    return out


def _in_range(inst: object, param: str, rng: random.Random) -> float:
    quantity, _, unit = param.rpartition("_")
    limits = getattr(inst, f"{quantity}_range_{unit}", None)
    if isinstance(limits, tuple) and len(limits) == 2:
        lo, hi = float(limits[0]), float(limits[1])
        if math.isfinite(lo) and math.isfinite(hi) and lo <= hi:
            return rng.uniform(lo, hi)
    return rng.choice(FLOAT_POOL)


def _value(inst: object, param: str, hint: Any, rng: random.Random) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        hint = options[0]
    if typing.get_origin(hint) is tuple:
        # ``tuple[X, ...]``: one value per element the instrument has (``axes_deg`` of a
        # polarisation controller), sometimes one too many; ``retardances_rad`` items are
        # drawn inside ``retardance_range_rad``
        item, *rest = typing.get_args(hint) or (Any,)
        if rest != [Ellipsis]:
            raise Unsupported(f"{param}: {hint!r}")
        count = len(getattr(inst, "axes_deg", ())) or rng.randrange(1, 5)
        count += rng.random() < 0.1
        quantity, _, unit = param.rpartition("_")
        singular = f"{quantity.removesuffix('s')}_{unit}"
        return tuple(_value(inst, singular, item, rng) for _ in range(count))
    hint = (typing.get_args(hint) or (hint,))[0]  # other generics: a lone item
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return rng.choice(list(hint))
    if hint is bool:
        return rng.random() < 0.5
    if hint is int:
        return rng.choice(INT_POOL)
    if hint is float:
        return _in_range(inst, param, rng)
    if hint is str:
        return rng.choice(["read NOP", "probe"])
    raise Unsupported(f"{param}: {hint!r}")


def call_args(inst: object, method: Callable[..., Any], rng: random.Random) -> list[Any]:
    """Positional arguments for ``method`` (raises Unsupported)."""
    hints = typing.get_type_hints(method)
    args = []
    for name, p in inspect.signature(method).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            continue
        args.append(_value(inst, name, hints.get(name, Any), rng))
    return args


def returns_ok(method: Callable[..., Any], value: Any) -> bool:
    """``value`` is of ``method``'s declared return type (simple types only; others pass)."""
    hint = typing.get_type_hints(method).get("return", Any)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            return type(None) in args
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
    if hint is type(None) or hint is None:
        return value is None
    if hint is float:
        return isinstance(value, float | int) and not isinstance(value, bool)
    if hint in (bool, int, str) or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return isinstance(value, hint)
    return True
