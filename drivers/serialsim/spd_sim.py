"""Simulated single-photon detector speaking our SPD-ASCII v1 line protocol.

See :mod:`drivers.ascii_spd` for the protocol. Physics kept to what the driver can see:
the click rate when armed is ``dark_count_rate_hz + photon_rate_hz * efficiency`` with
Poisson noise; light above ``latch_photon_rate_hz`` latches an armed detector (LATCHED,
cleared by RESET). Set the light with :meth:`SpdSimulator.illuminate`.

Run standalone: ``python -m drivers.serialsim.spd_sim --port 5026`` or ``--pty /tmp/spd0``.
"""

from __future__ import annotations

import argparse
import random

from drivers.ascii_spd import checksum, decode_line, encode_line
from drivers.interfaces import DetectorStatus
from drivers.serialsim.itla_sim import serve_forever
from drivers.serialsim.server import ProtocolHandler, SimServer

LIMITS = {
    "EFF": (5.0, 30.0),
    "DEAD": (1000.0, 100_000.0),
    "DELAY": (0.0, 100_000.0),
    "THR": (0.0, 3.0),
}

#: Settings at power-on.
FACTORY_DEFAULTS = {"EFF": 10.0, "DEAD": 10_000.0, "DELAY": 0.0, "THR": 1.0}


class SpdSimulator(ProtocolHandler):
    def __init__(self, dark_count_rate_hz: float = 500.0, seed: int = 1) -> None:
        self.dark_count_rate_hz = dark_count_rate_hz
        self.photon_rate_hz = 0.0
        self.latch_photon_rate_hz = 1e9
        self.values = dict(FACTORY_DEFAULTS)
        self.state = DetectorStatus.DISARMED
        #: the ``IDN?`` answer (another unit on the same port: change the serial number)
        self.identity = "QKDNODE-SIM,SPD-ASCII-1,SN000007,1.0"
        self._buf = bytearray()
        self._rng = random.Random(seed)

    def illuminate(self, photon_rate_hz: float) -> None:
        """Photons per second reaching the detector (test hook)."""
        self.photon_rate_hz = photon_rate_hz
        if self.state is DetectorStatus.ARMED and photon_rate_hz > self.latch_photon_rate_hz:
            self.state = DetectorStatus.LATCHED

    # --- ProtocolHandler ---------------------------------------------------------

    def reset_framing(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        replies = []
        while b"\n" in self._buf:
            idx = self._buf.index(b"\n")
            line, self._buf = bytes(self._buf[: idx + 1]), self._buf[idx + 1 :]
            replies.append(self._handle(line))
        return replies

    def factory_reset(self) -> None:
        """Power-on state: default settings, DISARMED (the light falling on it stays)."""
        self.values = dict(FACTORY_DEFAULTS)
        self.state = DetectorStatus.DISARMED
        self._buf.clear()

    def garble(self, reply: bytes) -> bytes:
        return b"#~?@ NOISE \x7f\n"

    def corrupt_checksum(self, reply: bytes) -> bytes:
        payload = reply[: reply.rindex(b"*")]
        return payload + f"*{checksum(payload) ^ 0x5A:02X}\n".encode()

    # --- instrument ------------------------------------------------------------------

    def _handle(self, line: bytes) -> bytes:
        try:
            text = decode_line(line)
        except ArithmeticError:
            return encode_line("ERR 3 CHECKSUM")
        except ValueError:
            return encode_line("ERR 5 SYNTAX")
        cmd, _, arg = text.partition(" ")
        if cmd == "IDN?":
            return encode_line(f"OK {self.identity}")
        if cmd == "LIM?":
            return encode_line(
                "OK " + " ".join(f"{k}={lo:g}:{hi:g}" for k, (lo, hi) in LIMITS.items())
            )
        if cmd.endswith("?") and cmd[:-1] in self.values:
            return encode_line(f"OK {self.values[cmd[:-1]]:.6g}")
        if cmd in self.values:
            try:
                value = float(arg)
            except ValueError:
                return encode_line("ERR 5 SYNTAX")
            lo, hi = LIMITS[cmd]
            if not lo <= value <= hi:
                return encode_line("ERR 2 RANGE")
            self.values[cmd] = value
            return encode_line("OK")
        if cmd == "ARM":
            if self.state in (DetectorStatus.LATCHED, DetectorStatus.FAULT):
                return encode_line(f"ERR 4 STATE {self.state.name}")
            self.state = DetectorStatus.ARMED
            self.illuminate(self.photon_rate_hz)
            return encode_line("OK")
        if cmd == "DISARM":
            if self.state is DetectorStatus.ARMED:
                self.state = DetectorStatus.DISARMED
            return encode_line("OK")
        if cmd == "RESET":
            self.state = DetectorStatus.DISARMED
            return encode_line("OK")
        if cmd == "STATE?":
            return encode_line(f"OK {self.state.name}")
        if cmd == "RATE?":
            return encode_line(f"OK {self._rate():.1f}")
        return encode_line("ERR 1 UNKNOWN")

    def _rate(self) -> float:
        if self.state is not DetectorStatus.ARMED:
            return 0.0
        mean = self.dark_count_rate_hz + self.photon_rate_hz * self.values["EFF"] / 100
        return max(0.0, self._rng.gauss(mean, mean**0.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated single-photon detector (SPD-ASCII v1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    where.add_argument("--pty", metavar="LINK", help="symlink to create for a pty slave")
    args = parser.parse_args(argv)
    sim = SpdSimulator()
    server = (
        SimServer(sim, mode="pty", link_path=args.pty)
        if args.pty
        else SimServer(sim, port=args.port)
    )
    return serve_forever(server)


if __name__ == "__main__":
    raise SystemExit(main())
