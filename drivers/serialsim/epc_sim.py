"""Simulated OZ Optics EPC driver box with an EPC-400 (four fiber squeezers).

Speaks the line protocol of :mod:`drivers.ozoptics_epc` (requests end CR LF; replies are
text lines ending with ``Done``, or a line ending ``Error!``) and models what the light
sees: each squeezer a linear retarder at its fast axis with a retardance
``pi * voltage_mv / half_wave_mv`` (:meth:`EpcSimulator.rotation`). In AC mode the
voltages are not held (the instrument scrambles), so :meth:`rotation` raises.

Power cycle (:meth:`factory_reset`): the box comes back at its power-up preset, the
state last stored with ``SAVE`` (here: 0 mV on every channel, in ``preset_mode``).

The reply to a refused request is a single ``Error!`` line; the instrument's exact
wording of its refusals was not found (see the driver's module).

Run standalone: ``python -m drivers.serialsim.epc_sim --port 7010`` or ``--pty /tmp/epc0``.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import numpy.typing as npt

from drivers.ozoptics_epc import CHANNELS, MAX_VOLTAGE_MV
from drivers.poincare import retarder_rotation
from drivers.serialsim.itla_sim import serve_forever
from drivers.serialsim.server import ProtocolHandler, SimServer

_SET_RE = re.compile(r"^V([1-4]),([+-]?\d+)$")
_SHORTCUT_RE = re.compile(r"^V([HLZ])([1-4])$")


class EpcSimulator(ProtocolHandler):
    """The box and its squeezers. ``echo``: repeat each request as the first reply line
    (some units do; the driver must cope)."""

    def __init__(
        self,
        axes_deg: tuple[float, ...] = (0.0, 45.0, 0.0, 45.0),
        half_wave_mv: tuple[float, ...] = (2500.0,) * CHANNELS,
        preset_mode: str = "DC",
        echo: bool = False,
    ) -> None:
        self.axes_deg = axes_deg
        self.half_wave_mv = half_wave_mv
        self.preset_mode = preset_mode
        self.echo = echo
        self.voltages_mv = [0] * CHANNELS
        self.mode = preset_mode
        self.saved = False
        self._buf = bytearray()

    def rotation(self) -> npt.NDArray[np.float64]:
        """The squeezers' rotation of the Poincaré sphere, light crossing channel 1 first."""
        if self.mode != "DC":
            raise RuntimeError("AC mode: the squeezers are scrambling")
        retardances = [
            np.pi * v / hw for v, hw in zip(self.voltages_mv, self.half_wave_mv, strict=True)
        ]
        return retarder_rotation(self.axes_deg, retardances)

    # --- ProtocolHandler ---------------------------------------------------------

    def reset_framing(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        replies = []
        while b"\n" in self._buf:
            idx = self._buf.index(b"\n")
            line, self._buf = bytes(self._buf[: idx + 1]), self._buf[idx + 1 :]
            request = line.strip()
            if not request:
                continue
            reply = self._handle(request.decode("ascii", "replace"))
            if self.echo:
                reply = request + b"\r\n" + reply
            replies.append(reply)
        if len(self._buf) > 1024:  # a line that never ends: the box drops it
            self._buf.clear()
        return replies

    def factory_reset(self) -> None:
        """Power-up preset: 0 mV everywhere, ``preset_mode``."""
        self.voltages_mv = [0] * CHANNELS
        self.mode = self.preset_mode
        self._buf.clear()

    def garble(self, reply: bytes) -> bytes:
        return b"Voltage(mV): CH1 ++ CH7 x\r\nDone\r\n"

    def corrupt_checksum(self, reply: bytes) -> bytes:
        return self.garble(reply)  # the protocol has no checksum

    # --- instrument ------------------------------------------------------------------

    @staticmethod
    def _ok(text: str) -> bytes:
        return f"{text}\r\nDone\r\n".encode("ascii")

    def _handle(self, request: str) -> bytes:
        if request == "V?":
            chans = " ".join(f"CH{i + 1} {v:+d}" for i, v in enumerate(self.voltages_mv))
            return self._ok(f"Voltage(mV): {chans}")
        if request == "M?":
            return self._ok("Work Mode: DC" if self.mode == "DC" else "Work Mode: AC(Sine)")
        if request in ("MDC", "MAC"):
            self.mode = request[1:]
            return self._ok(f"Set To {self.mode} Mode")
        if request == "SAVE":
            self.saved = True
            return self._ok("Write Setting to Flash memory")
        m = _SET_RE.match(request)
        if m is not None:
            ch, mv = int(m.group(1)), int(m.group(2))
            if abs(mv) > MAX_VOLTAGE_MV:
                return b"Error!\r\n"
            self.voltages_mv[ch - 1] = mv
            return self._ok(f"Set CH{ch} DC Voltage at: {mv}mV")
        m = _SHORTCUT_RE.match(request)
        if m is not None:
            ch = int(m.group(2))
            mv = {"H": MAX_VOLTAGE_MV, "L": -MAX_VOLTAGE_MV, "Z": 0}[m.group(1)]
            self.voltages_mv[ch - 1] = mv
            return self._ok(f"Set CH{ch} DC Voltage at: {mv}mV")
        return b"Error!\r\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated OZ Optics EPC driver + EPC-400")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    where.add_argument("--pty", metavar="LINK", help="symlink to create for a pty slave")
    args = parser.parse_args(argv)
    sim = EpcSimulator()
    server = (
        SimServer(sim, mode="pty", link_path=args.pty)
        if args.pty
        else SimServer(sim, port=args.port)
    )
    return serve_forever(server)


if __name__ == "__main__":
    raise SystemExit(main())
