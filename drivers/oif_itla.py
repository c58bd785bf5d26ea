"""OIF-ITLA-MSA (01.3) integrable tunable laser assembly over a serial link (Laser).

Framing (4 bytes, big-endian, pure functions below)::

    host -> module   byte0 = [BIP-4 (7:4)] [LstRsp (3)] [0 0 (2:1)] [RW (0), 1 = write]
                     byte1 = register, byte2..3 = 16-bit data
    module -> host   byte0 = [BIP-4 (7:4)] [CE (3)] [0 (2)] [status (1:0)]
                     status 0 OK, 1 XE (execution error: read NOP for the reason),
                     2 AEA (string follows through register 0x0B), 3 CP (command pending)

BIP-4: ``bip8 = (byte0 & 0x0F) ^ byte1 ^ byte2 ^ byte3``; ``bip4 = (bip8 >> 4) ^ (bip8 & 0x0F)``.

Registers used: NOP 0x00 (pending flags 15:8, MRDY bit 4, error field 3:0), DevTyp 0x01,
MFGR 0x02, Model 0x03, SerNo 0x04 (AEA strings), AEA-EAR 0x0B, StatusF 0x20, Channel 0x30,
PWR 0x31 (dBm x 100, signed), ResEna 0x32 (SENA bit 3), FCF1 0x35 (THz), FCF2 0x36
(GHz x 10), LF1 0x40, LF2 0x41, OOP 0x42 (dBm x 100), CTemp 0x43 (degC x 100),
OPSL 0x50, OPSH 0x51, LFL1 0x52, LFL2 0x53, LFH1 0x54, LFH2 0x55.

Limits (power, frequency) are read from the module at connect. The module refuses to
retune while the output is enabled (NOP error CIE): :meth:`set_wavelength_nm` then raises
:class:`InstrumentReportedError`.

Pending operations (OIF-ITLA-MSA-01.3 reply status field and NOP register; the wording
here follows Pure Photonics' reference host code, which after a CP status polls NOP
until ``NOP & 0xFF00`` is 0, and the status and NOP error tables of the ``itla`` Python
package): a command the module cannot finish within its reply time is answered with
status CP ("command not complete, pending") and a bit of NOP's pending-operation field
(15:8) stays set until the operation ends; a command refused meanwhile fails with XE and
NOP error CIP ("command ignored, operation pending"). CP is therefore never "done":
after a CP reply, and after every write that starts an operation (Channel: tune to the
channel; ResEna: laser on/off), the driver polls NOP until bits 15:8 are clear, for at
most ``options.pending_timeout_s`` (then :class:`InstrumentTimeoutError` naming the
instrument, the command and NOP), and reports a non-zero NOP error field at the end as
:class:`InstrumentReportedError`. A read answered CP is read again once the flags clear.
The transport lock is held throughout, so no other thread's command lands mid-operation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

from pydantic import Field

from drivers.common import DriverOptions, check_range, health_check
from drivers.errors import (
    ChecksumError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    ProtocolError,
)
from drivers.interfaces import HealthLevel, InstrumentHealth, Laser, LaserStatus
from drivers.restore import SettingsMemory
from drivers.transports.serial import ReplyReader, SerialTransport

#: Speed of light in nm * THz.
C_NM_THZ = 299_792.458


class Reg(IntEnum):
    NOP = 0x00
    DEV_TYP = 0x01
    MFGR = 0x02
    MODEL = 0x03
    SER_NO = 0x04
    AEA_EAR = 0x0B
    STATUS_F = 0x20
    CHANNEL = 0x30
    PWR = 0x31
    RES_ENA = 0x32
    FCF1 = 0x35
    FCF2 = 0x36
    LF1 = 0x40
    LF2 = 0x41
    OOP = 0x42
    CTEMP = 0x43
    OPSL = 0x50
    OPSH = 0x51
    LFL1 = 0x52
    LFL2 = 0x53
    LFH1 = 0x54
    LFH2 = 0x55


class Status(IntEnum):
    OK = 0
    XE = 1
    AEA = 2
    CP = 3


#: NOP error field (bits 3:0) meanings.
NOP_ERRORS = {
    0x0: "OK",
    0x1: "RNI register not implemented",
    0x2: "RNW register not writable",
    0x3: "RVE register value range error",
    0x4: "CIP command ignored, operation pending",
    0x5: "CII command ignored, initializing",
    0x6: "ERE extended address range error",
    0x7: "ERO extended address read only",
    0x8: "EXF execution general failure",
    0x9: "CIE command ignored while optical output enabled",
    0xA: "IVC invalid configuration",
}

SENA = 0x08
STATUS_F_FATAL = 1 << 13
FRAME_LEN = 4
#: NOP fields: pending-operation flags, module ready, error code of the last command.
NOP_PENDING_MASK = 0xFF00
NOP_MRDY = 0x0010
NOP_ERROR_MASK = 0x000F
#: Longest identity string (DevTyp, MFGR, Model, SerNo) read through AEA: the MSA's
#: strings are a few tens of bytes; more is a corrupted length.
MAX_AEA_STRING_BYTES = 256
#: Writes that start an operation the module may still be executing after its reply.
STARTS_PENDING = frozenset({Reg.CHANNEL, Reg.RES_ENA})


def bip4(frame: bytes) -> int:
    """BIP-4 checksum of a 4-byte frame (the top nibble of byte 0 is ignored)."""
    bip8 = (frame[0] & 0x0F) ^ frame[1] ^ frame[2] ^ frame[3]
    return ((bip8 >> 4) ^ bip8) & 0x0F


def encode_request(
    register: int, data: int = 0, write: bool = False, lst_rsp: bool = False
) -> bytes:
    """Host-to-module frame with its checksum."""
    if not 0 <= register <= 0xFF or not 0 <= data <= 0xFFFF:
        raise ValueError(f"register {register} or data {data} out of the frame's range")
    b0 = (0x08 if lst_rsp else 0) | (0x01 if write else 0)
    frame = bytes([b0, register, data >> 8, data & 0xFF])
    return bytes([(bip4(frame) << 4) | b0]) + frame[1:]


@dataclass(frozen=True)
class Reply:
    status: Status
    register: int
    data: int
    ce: bool


def decode_reply(frame: bytes) -> Reply:
    """Module-to-host frame; raises ValueError on a checksum mismatch (caller wraps it)."""
    if len(frame) != FRAME_LEN:
        raise ValueError(f"frame of {len(frame)} bytes")
    if frame[0] >> 4 != bip4(frame):
        raise ValueError(f"checksum {frame[0] >> 4:#x} != computed {bip4(frame):#x}")
    return Reply(
        Status(frame[0] & 0x03), frame[1], (frame[2] << 8) | frame[3], bool(frame[0] & 0x08)
    )


def encode_reply(status: Status, register: int, data: int, ce: bool = False) -> bytes:
    """Module-to-host frame (used by the simulator and by protocol tests)."""
    b0 = (0x08 if ce else 0) | int(status)
    frame = bytes([b0, register, (data >> 8) & 0xFF, data & 0xFF])
    return bytes([(bip4(frame) << 4) | b0]) + frame[1:]


def to_signed16(v: int) -> int:
    return v - 0x10000 if v & 0x8000 else v


def to_unsigned16(v: int) -> int:
    return v & 0xFFFF


def frequency_to_fcf(frequency_thz: float) -> tuple[int, int]:
    """(FCF1 in THz, FCF2 in 0.1 GHz) for a frequency in THz."""
    units = round(frequency_thz * 10_000)  # 0.1 GHz steps
    return units // 10_000, units % 10_000


class OifItlaOptions(DriverOptions):
    baudrate: int = Field(9600, description="ITLA modules start at 9600 baud")
    resync_gap_s: float = Field(
        0.05, ge=0, le=1, description="silence after an error so the module drops a partial frame"
    )
    pending_timeout_s: float = Field(
        60.0, gt=0, le=600, description="longest wait for NOP's pending flags to clear"
    )
    pending_poll_s: float = Field(
        0.05, gt=0, le=5, description="interval between NOP reads while an operation is pending"
    )


class OifItlaLaser(Laser):
    """ITLA tunable laser; power setpoint in dBm, wavelength via FCF1/FCF2."""

    Options = OifItlaOptions

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: OifItlaOptions | None = None,
        transport: SerialTransport | None = None,
    ) -> None:
        self.name = name
        self.options = options or OifItlaOptions()
        self.transport = transport or SerialTransport.for_driver(
            name, resource, timeout_s, self.options
        )
        self.power_range_dbm = (-100.0, 100.0)
        self.wavelength_range_nm = (0.0, 1e6)
        self._connected = False
        #: settings made through this driver, put back after a power cycle
        self.memory = SettingsMemory(name)
        self.transport.after_reopen.callback = self.check_settings

    # --- register access --------------------------------------------------------

    @staticmethod
    def _describe(register: int, data: int, write: bool) -> str:
        try:
            reg_name = Reg(register).name
        except ValueError:
            reg_name = f"{register:#04x}"
        if write:
            return f"write {reg_name} {data:#06x}"
        return f"read {reg_name}"

    def _transact(self, register: int, data: int, write: bool, command: str) -> Reply:
        """One checked frame exchange (checksum, CE, register echo); status not interpreted."""

        def read(reader: ReplyReader) -> bytes:
            return reader.exact(FRAME_LEN)

        with self.transport.lock:
            try:
                raw = self.transport.exchange(command, encode_request(register, data, write), read)
                try:
                    reply = decode_reply(raw)
                except ValueError as exc:
                    raise ChecksumError(self.name, command, f"reply {raw.hex()}: {exc}") from None
                if reply.ce:
                    raise ChecksumError(
                        self.name, command, "module reports a checksum error (CE) in our request"
                    )
                if reply.register != register:
                    raise ProtocolError(
                        self.name, command, f"reply for register {reply.register:#04x} {raw.hex()}"
                    )
            except (ProtocolError, InstrumentTimeoutError):
                self._resync()
                raise
            return reply

    def _exchange(self, register: int, data: int = 0, write: bool = False) -> Reply:
        command = self._describe(register, data, write)
        with self.transport.lock:
            reply = self._transact(register, data, write, command)
            if reply.status == Status.XE:
                nop = self._transact(Reg.NOP, 0, False, command + " (NOP)").data
                reason = NOP_ERRORS.get(nop & NOP_ERROR_MASK, f"error {nop & NOP_ERROR_MASK:#x}")
                raise InstrumentReportedError(self.name, command, f"execution error: {reason}")
            if reply.status == Status.CP or (write and register in STARTS_PENDING):
                self.wait_not_pending(command)
                if reply.status == Status.CP and not write:
                    reply = self._transact(register, data, write, command)
            return reply

    def operation_pending(self) -> bool:
        """True while NOP's pending-operation flags (15:8) are set (or NOP answers CP)."""
        nop = self._transact(Reg.NOP, 0, False, "read NOP")
        return bool(nop.data & NOP_PENDING_MASK) or nop.status == Status.CP

    def wait_not_pending(self, command: str) -> None:
        """Poll NOP until no operation is pending; ``command`` started it (named in errors)."""
        timeout_s = self.options.pending_timeout_s
        deadline = time.monotonic() + timeout_s
        with self.transport.lock:
            while True:
                nop = self._transact(Reg.NOP, 0, False, command + " (NOP)")
                flags = (nop.data & NOP_PENDING_MASK) >> 8
                if not flags and nop.status != Status.CP:
                    error = nop.data & NOP_ERROR_MASK
                    if error:
                        reason = NOP_ERRORS.get(error, f"error {error:#x}")
                        raise InstrumentReportedError(
                            self.name, command, f"pending operation failed: NOP error {reason}"
                        )
                    return
                if time.monotonic() >= deadline:
                    raise InstrumentTimeoutError(
                        self.name,
                        command,
                        f"register NOP (0x00) still reports pending operation flags "
                        f"{flags:#04x} after {timeout_s:g} s",
                    )
                time.sleep(self.options.pending_poll_s)

    def _resync(self) -> None:
        time.sleep(self.options.resync_gap_s)
        self.transport.discard_input()

    def read_register(self, register: int) -> int:
        return self._exchange(register).data

    def write_register(self, register: int, data: int) -> None:
        self._exchange(register, data, write=True)

    def read_string(self, register: int) -> str:
        """An AEA string register (DevTyp, MFGR, Model, SerNo). A length above
        MAX_AEA_STRING_BYTES raises ProtocolError (a corrupted length would otherwise
        keep the port busy for up to 32768 reads)."""
        with self.transport.lock:
            reply = self._exchange(register)
            if reply.status != Status.AEA:
                return ""
            n = reply.data
            if n > MAX_AEA_STRING_BYTES:
                raise ProtocolError(
                    self.name,
                    self._describe(register, 0, False),
                    f"AEA string of {n} bytes (more than {MAX_AEA_STRING_BYTES})",
                )
            out = bytearray()
            while len(out) < n:
                word = self._exchange(Reg.AEA_EAR).data
                out += bytes([word >> 8, word & 0xFF])
        return out[:n].rstrip(b"\x00").decode("ascii", errors="replace")

    # --- Instrument ---------------------------------------------------------------

    def connect(self) -> None:
        with self.transport.lock:
            if self._connected:
                return
            with self.transport.opened_for_setup():
                self.read_register(Reg.NOP)
                serial_number = self.read_string(Reg.SER_NO)
                # another module on this port since the first connect: refuse it
                self.memory.check_identity(serial_number)
                self.memory.remember_identity(serial_number, lambda: self.read_string(Reg.SER_NO))
                self._read_limits()
                self.check_settings()
            self._connected = True

    def _read_limits(self) -> None:
        with self.transport.lock:
            pmin = to_signed16(self.read_register(Reg.OPSL)) / 100
            pmax = to_signed16(self.read_register(Reg.OPSH)) / 100
            fmin = self.read_register(Reg.LFL1) + self.read_register(Reg.LFL2) / 10_000
            fmax = self.read_register(Reg.LFH1) + self.read_register(Reg.LFH2) / 10_000
        if not (pmin < pmax and 0 < fmin < fmax):
            raise ProtocolError(
                self.name,
                "read limits",
                f"implausible limits P {pmin}..{pmax} F {fmin}..{fmax}",
            )
        self.power_range_dbm = (pmin, pmax)
        self.wavelength_range_nm = (C_NM_THZ / fmax, C_NM_THZ / fmin)

    def check_settings(self) -> None:
        """Read back the settings made through this driver; put them back if the module
        lost them (a power cycle). Raises SettingsLostError if that fails."""
        with self.transport.lock:
            self.memory.restore(self._read_limits, self.transport.drop_connection)

    def close(self) -> None:
        self._connected = False
        self.transport.close()

    def identify(self) -> str:
        with self.transport.lock:
            parts = [self.read_string(r) for r in (Reg.MFGR, Reg.MODEL, Reg.SER_NO, Reg.DEV_TYP)]
        return ",".join(parts)

    def safe_state(self) -> None:
        self.set_emission(False)

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.check_settings()
            status_f = self.read_register(Reg.STATUS_F)
            if status_f & STATUS_F_FATAL:
                return InstrumentHealth(HealthLevel.FAULT, f"StatusF {status_f:#06x}: fatal")
            return InstrumentHealth(HealthLevel.OK, f"StatusF {status_f:#06x}")

        return self.memory.report(health_check(self.name, probe))

    # --- Laser ---------------------------------------------------------------------

    def set_emission(self, on: bool) -> None:
        if not on:
            self.memory.switching_off("emission_on")
        self.write_register(Reg.RES_ENA, SENA if on else 0)
        self.memory.remember(
            "emission_on", on, lambda: self.set_emission(on), self.emission_on, enables=True
        )

    def emission_on(self) -> bool:
        return bool(self.read_register(Reg.RES_ENA) & SENA)

    def set_power_dbm(self, power_dbm: float) -> None:
        p = check_range(self.name, "write PWR", "power", power_dbm, self.power_range_dbm, "dBm")
        self.write_register(Reg.PWR, to_unsigned16(round(p * 100)))
        self.memory.remember(
            "power_dbm", p, lambda: self.set_power_dbm(p), self.power_dbm, tolerance=0.005
        )

    def power_dbm(self) -> float:
        """Power setpoint (PWR) in dBm; :meth:`output_power_dbm` reads the measured OOP."""
        return to_signed16(self.read_register(Reg.PWR)) / 100

    def output_power_dbm(self) -> float:
        """Measured optical output power (OOP) in dBm (an addition to the interface)."""
        return to_signed16(self.read_register(Reg.OOP)) / 100

    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        wl = check_range(
            self.name,
            "write FCF1/FCF2",
            "wavelength",
            wavelength_nm,
            self.wavelength_range_nm,
            "nm",
        )
        fcf1, fcf2 = frequency_to_fcf(C_NM_THZ / wl)
        with self.transport.lock:
            self.write_register(Reg.FCF1, fcf1)
            self.write_register(Reg.FCF2, fcf2)
            self.write_register(Reg.CHANNEL, 1)
        # FCF resolution is 0.1 GHz: under 1 pm at 1550 nm
        self.memory.remember(
            "wavelength_nm",
            wl,
            lambda: self.set_wavelength_nm(wl),
            self.wavelength_nm,
            tolerance=0.002,
        )

    def wavelength_nm(self) -> float:
        with self.transport.lock:
            f_thz = self.read_register(Reg.LF1) + self.read_register(Reg.LF2) / 10_000
        if f_thz <= 0:
            raise ProtocolError(self.name, "read LF1/LF2", f"frequency {f_thz} THz")
        return C_NM_THZ / f_thz

    def temperature_c(self) -> float:
        return to_signed16(self.read_register(Reg.CTEMP)) / 100

    def status(self) -> LaserStatus:
        with self.transport.lock:
            if self.read_register(Reg.STATUS_F) & STATUS_F_FATAL:
                return LaserStatus.FAULT
            if not self.emission_on():
                return LaserStatus.OFF
            pending = self.operation_pending()
        return LaserStatus.WARMING_UP if pending else LaserStatus.LOCKED
