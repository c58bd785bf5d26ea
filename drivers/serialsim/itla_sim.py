"""Simulated OIF-ITLA tunable laser speaking the MSA 4-byte register protocol.

Behaviour: registers of :mod:`drivers.oif_itla`; AEA strings for DevTyp/MFGR/Model/SerNo;
an unknown register fails with XE/RNI; a request with a bad checksum is answered with the
CE flag. A partial frame is dropped after 50 ms of silence (the MSA's resynchronisation).

Pending operations, as the MSA describes them: enabling the output (ResEna SENA) and
tuning to a channel (a Channel write) are answered with status CP, not OK, and set a NOP
pending-operation flag (bit 8) for ``tune_time_s``. While it is set the laser frequency
(LF1/LF2) still reads the old channel and OOP reads no light; the new frequency appears
when the flag clears. A write to Channel or FCF1/FCF2, or enabling the output, during
the operation fails with XE and NOP error CIP (command ignored, operation pending);
disabling the output is always accepted and abandons an enable in progress. Retuning (FCF1/FCF2/
Channel) while the output is enabled fails with XE and NOP error CIE.

Run standalone: ``python -m drivers.serialsim.itla_sim --port 5025`` (TCP on 127.0.0.1)
or ``--pty /tmp/itla0`` (symlink to a pty slave).
"""

from __future__ import annotations

import argparse
import time

from drivers.oif_itla import (
    C_NM_THZ,
    FRAME_LEN,
    NOP_ERRORS,
    SENA,
    Reg,
    Status,
    bip4,
    encode_reply,
    frequency_to_fcf,
    to_unsigned16,
)
from drivers.serialsim.server import ProtocolHandler, SimServer

_ERR_RNI, _ERR_RNW, _ERR_RVE, _ERR_CIP, _ERR_CIE = 0x1, 0x2, 0x3, 0x4, 0x9
_PENDING_FLAG = 0x0100
_READ_ONLY = {
    Reg.NOP,
    Reg.DEV_TYP,
    Reg.MFGR,
    Reg.MODEL,
    Reg.SER_NO,
    Reg.AEA_EAR,
    Reg.LF1,
    Reg.LF2,
    Reg.OOP,
    Reg.CTEMP,
    Reg.OPSL,
    Reg.OPSH,
    Reg.LFL1,
    Reg.LFL2,
    Reg.LFH1,
    Reg.LFH2,
}
_TUNING = {Reg.FCF1, Reg.FCF2, Reg.CHANNEL}
assert _ERR_CIE in NOP_ERRORS and _ERR_CIP in NOP_ERRORS


class ItlaSimulator(ProtocolHandler):
    frame_gap_s = 0.05

    def __init__(
        self,
        tune_time_s: float = 0.2,
        power_limits_dbm: tuple[float, float] = (7.0, 13.5),
        frequency_limits_thz: tuple[float, float] = (191.5, 196.25),
        strings: dict[Reg, str] | None = None,
    ) -> None:
        self.tune_time_s = tune_time_s
        self.strings = strings or {
            Reg.DEV_TYP: "CW ITLA",
            Reg.MFGR: "QKDNODE-SIM",
            Reg.MODEL: "ITLA-SIM-1",
            Reg.SER_NO: "SN000042",
        }
        self._buf = bytearray()
        self._aea = b""
        self._error = 0
        self._pending_until = 0.0
        self._pending_register = -1  # the write that started the operation
        self._on_done: list[tuple[int, int]] = []  # register writes applied when it ends
        self.power_limits_dbm = power_limits_dbm
        self.frequency_limits_thz = frequency_limits_thz
        self.regs: dict[int, int] = {}
        self.factory_reset()

    def factory_reset(self) -> None:
        """Power-on registers: output off, 10 dBm setpoint, 1550 nm, no operation pending."""
        power_limits_dbm, frequency_limits_thz = self.power_limits_dbm, self.frequency_limits_thz
        self._buf.clear()
        self._aea = b""
        self._error = 0
        self._pending_until = 0.0
        self._pending_register = -1
        self._on_done = []
        lo_f1, lo_f2 = frequency_to_fcf(frequency_limits_thz[0])
        hi_f1, hi_f2 = frequency_to_fcf(frequency_limits_thz[1])
        f1, f2 = frequency_to_fcf(C_NM_THZ / 1550.0)
        self.regs = {
            Reg.STATUS_F: 0,
            Reg.CHANNEL: 1,
            Reg.PWR: to_unsigned16(1000),
            Reg.RES_ENA: 0,
            Reg.FCF1: f1,
            Reg.FCF2: f2,
            Reg.LF1: f1,
            Reg.LF2: f2,
            Reg.CTEMP: to_unsigned16(3512),
            Reg.OPSL: to_unsigned16(round(power_limits_dbm[0] * 100)),
            Reg.OPSH: to_unsigned16(round(power_limits_dbm[1] * 100)),
            Reg.LFL1: lo_f1,
            Reg.LFL2: lo_f2,
            Reg.LFH1: hi_f1,
            Reg.LFH2: hi_f2,
        }

    # --- ProtocolHandler ---------------------------------------------------------

    def reset_framing(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        replies = []
        while len(self._buf) >= FRAME_LEN:
            frame, self._buf = bytes(self._buf[:FRAME_LEN]), self._buf[FRAME_LEN:]
            replies.append(self._handle(frame))
        return replies

    def garble(self, reply: bytes) -> bytes:
        # A well-formed frame for another register: the driver must notice the mismatch.
        return encode_reply(Status.OK, (reply[1] + 0x11) & 0xFF, 0xBEEF)

    def corrupt_checksum(self, reply: bytes) -> bytes:
        return bytes([reply[0] ^ 0x10]) + reply[1:]

    # --- instrument ------------------------------------------------------------------

    def _pending(self) -> bool:
        if time.monotonic() < self._pending_until:
            return True
        for register, value in self._on_done:
            self.regs[register] = value
        self._on_done.clear()
        return False

    def _start_pending(self, register: int, data: int, on_done: list[tuple[int, int]]) -> bytes:
        self._pending_until = time.monotonic() + self.tune_time_s
        self._pending_register = register
        self._on_done = on_done
        return encode_reply(Status.CP, register, data)

    def set_fatal(self, fatal: bool) -> None:
        """Test hook: raise or clear the StatusF FATAL bit."""
        if fatal:
            self.regs[Reg.STATUS_F] |= 1 << 13
        else:
            self.regs[Reg.STATUS_F] &= ~(1 << 13)

    def _xe(self, register: int, error: int) -> bytes:
        self._error = error
        return encode_reply(Status.XE, register, 0)

    def _handle(self, frame: bytes) -> bytes:
        self._pending()  # an operation that has ended takes effect before this request
        register = frame[1]
        if frame[0] >> 4 != bip4(frame):
            return encode_reply(Status.XE, register, 0, ce=True)
        write = bool(frame[0] & 0x01)
        data = (frame[2] << 8) | frame[3]
        if write:
            return self._write(register, data)
        return self._read(register)

    def _read(self, register: int) -> bytes:
        if register == Reg.NOP:
            value = (_PENDING_FLAG if self._pending() else 0) | 0x0010 | self._error
            self._error = 0
            return encode_reply(Status.OK, register, value)
        if register in self.strings:
            text = self.strings[Reg(register)].encode("ascii")
            self._aea = text + b"\x00" * (len(text) % 2)
            return encode_reply(Status.AEA, register, len(text))
        if register == Reg.AEA_EAR:
            word, self._aea = self._aea[:2], self._aea[2:]
            word = word.ljust(2, b"\x00")
            return encode_reply(Status.OK, register, (word[0] << 8) | word[1])
        if register == Reg.OOP:
            on = self.regs[Reg.RES_ENA] & SENA and not self._pending()
            return encode_reply(
                Status.OK, register, self.regs[Reg.PWR] if on else to_unsigned16(-9999)
            )
        if register in self.regs:
            return encode_reply(Status.OK, register, self.regs[register])
        return self._xe(register, _ERR_RNI)

    def _write(self, register: int, data: int) -> bytes:
        if register in _READ_ONLY:
            return self._xe(register, _ERR_RNW)
        if register not in self.regs:
            return self._xe(register, _ERR_RNI)
        starts = register in _TUNING or (register == Reg.RES_ENA and bool(data & SENA))
        if starts and self._pending():
            return self._xe(register, _ERR_CIP)
        if register in _TUNING and self.regs[Reg.RES_ENA] & SENA:
            return self._xe(register, _ERR_CIE)
        if register == Reg.PWR:
            p = data - 0x10000 if data & 0x8000 else data
            if not _signed(self.regs[Reg.OPSL]) <= p <= _signed(self.regs[Reg.OPSH]):
                return self._xe(register, _ERR_RVE)
        self.regs[register] = data
        if register == Reg.RES_ENA and data & SENA:
            return self._start_pending(register, data, [])
        if register == Reg.RES_ENA and self._pending_register == Reg.RES_ENA:
            self._pending_until = 0.0  # output disabled: an enable in progress is abandoned
        if register == Reg.CHANNEL:
            tuned: list[tuple[int, int]] = [
                (Reg.LF1, self.regs[Reg.FCF1]),
                (Reg.LF2, self.regs[Reg.FCF2]),
            ]
            return self._start_pending(register, data, tuned)
        return encode_reply(Status.OK, register, data)


def _signed(v: int) -> int:
    return v - 0x10000 if v & 0x8000 else v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated OIF-ITLA laser")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    where.add_argument("--pty", metavar="LINK", help="symlink to create for a pty slave")
    parser.add_argument("--tune-time-s", type=float, default=0.2)
    args = parser.parse_args(argv)
    sim = ItlaSimulator(tune_time_s=args.tune_time_s)
    server = (
        SimServer(sim, mode="pty", link_path=args.pty)
        if args.pty
        else SimServer(sim, port=args.port)
    )
    return serve_forever(server)


def serve_forever(server: SimServer) -> int:
    server.start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
