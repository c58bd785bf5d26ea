"""Simulated Single Quantum SNSPD controller: the JSON control port and the counts port.

Speaks the protocol described in :mod:`drivers.single_quantum` on two TCP ports of
127.0.0.1: control (JSON in, JSON + ``\\x17`` out, label broadcasts after each change)
and counts (one ``time,c1,...,cN`` line per measurement period to every connected client).

Physics per detector, kept to what the settings change: detection efficiency rises with
the bias as ``eff_max / (1 + exp(-(I - knee_ua) / width_ua))``; dark counts grow as
``dark_floor_hz * exp((I - knee_ua) / dark_scale_ua)``; above ``switching_current_ua`` the
enabled nanowire latches (bias voltage jumps to ``latched_voltage_mv``, it counts nothing)
until the bias is switched off. A trigger level above ``pulse_amplitude_mv`` sees nothing.
Counts are Poisson-distributed (seeded). The cold stage sits at ``stage_temperature_k``.

Faults (:meth:`SingleQuantumSim.inject`): ``garble`` (the next reply is not JSON),
``no_reply`` (the next request is ignored), ``error`` (the next command is answered with
an ``Error`` label), ``drop`` (both connections are closed).

Run standalone: ``python -m drivers.netsim.single_quantum`` prints the control URL and the
counts port, e.g. for ``qkdnode drivers probe tcp://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import json
import math
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drivers.single_quantum import parse_objects

ETB = b"\x17"


@dataclass
class SnspdPhysics:
    eff_max: float = 0.85
    knee_ua: float = 10.0
    width_ua: float = 0.8
    dark_floor_hz: float = 20.0
    dark_scale_ua: float = 2.0
    switching_current_ua: float = 15.0
    latched_voltage_mv: float = 400.0
    pulse_amplitude_mv: float = 300.0
    photon_rate_hz: float = 0.0


@dataclass
class _State:
    detectors: int = 4
    bias_ua: list[float] = field(default_factory=lambda: [0.0] * 4)
    trigger_mv: list[float] = field(default_factory=lambda: [100.0] * 4)
    enabled: bool = False
    latched: list[bool] = field(default_factory=lambda: [False] * 4)
    period_ms: int = 100


class SingleQuantumSim:
    """The controller; ``port`` and ``counts_port`` are chosen by the OS."""

    def __init__(self, detectors: int = 4, seed: int = 1, stage_temperature_k: float = 2.45):
        self.state = _State(
            detectors,
            [0.0] * detectors,
            [100.0] * detectors,
            False,
            [False] * detectors,
        )
        self.physics = [SnspdPhysics() for _ in range(detectors)]
        self.stage_temperature_k = stage_temperature_k
        self.bias_limit_ua = 90.9  # a controller limited further clamps the bias here
        self.requests_seen = 0
        self._rng = np.random.default_rng(seed)
        self._faults: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._listen = self._listener()
        self._listen_counts = self._listener()
        self.port = self._listen.getsockname()[1]
        self.counts_port = self._listen_counts.getsockname()[1]
        self._clients: list[socket.socket] = []
        self._counts_clients: list[socket.socket] = []
        self._rx: dict[socket.socket, bytes] = {}
        self._thread = threading.Thread(target=self._run, name="sq-snspd-sim", daemon=True)
        self._cycle = threading.Event()
        self._cycled = threading.Event()

    @staticmethod
    def _listener() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        return s

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    # --- life cycle, test hooks --------------------------------------------------------------

    def start(self) -> SingleQuantumSim:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for s in [self._listen, self._listen_counts, *self._clients, *self._counts_clients]:
            s.close()

    def __enter__(self) -> SingleQuantumSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def illuminate(self, detector: int, photon_rate_hz: float) -> None:
        """Photons per second reaching ``detector`` (1-based)."""
        with self._lock:
            self.physics[detector - 1].photon_rate_hz = photon_rate_hz

    def power_cycle(self) -> None:
        """Off and on: every connection dropped, every setting back at its power-on
        default (bias 0 uA, trigger 100 mV, disabled, nothing latched). Done by the
        server thread between two selects (it owns the sockets); returns when done."""
        if not self._thread.is_alive():
            self._power_on()
            return
        self._cycled.clear()
        self._cycle.set()
        if not self._cycled.wait(2.0):
            raise RuntimeError("the simulator's server thread did not power-cycle")

    def _power_on(self) -> None:
        with self._lock:
            self._close_all()
            n = self.state.detectors
            self.state = _State(n, [0.0] * n, [100.0] * n, False, [False] * n)
            self._faults.clear()

    def inject(self, fault: str, count: int = 1) -> None:
        if fault not in ("garble", "no_reply", "error", "drop"):
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._faults[fault] = count

    def _take_fault(self, *names: str) -> str | None:
        for name in names:
            if self._faults.get(name, 0) > 0:
                self._faults[name] -= 1
                return name
        return None

    # --- physics -----------------------------------------------------------------------------

    def rate_hz(self, k: int) -> float:
        """Mean count rate of detector ``k`` (0-based) with the present settings."""
        st, ph = self.state, self.physics[k]
        if not st.enabled or st.latched[k] or st.trigger_mv[k] >= ph.pulse_amplitude_mv:
            return 0.0
        i = st.bias_ua[k]
        if i <= 0:
            return 0.0
        eff = ph.eff_max / (1 + math.exp(-(i - ph.knee_ua) / ph.width_ua))
        dark = ph.dark_floor_hz * math.exp((i - ph.knee_ua) / ph.dark_scale_ua)
        return eff * ph.photon_rate_hz + dark

    def _update_latches(self) -> None:
        st = self.state
        for k in range(st.detectors):
            if not st.enabled:
                st.latched[k] = False
            elif st.bias_ua[k] > self.physics[k].switching_current_ua:
                st.latched[k] = True

    def _bias_voltage_mv(self) -> list[float]:
        st = self.state
        return [
            self.physics[k].latched_voltage_mv
            if st.latched[k]
            else (0.02 * st.bias_ua[k] if st.enabled else 0.0)
            for k in range(st.detectors)
        ]

    # --- server -------------------------------------------------------------------------

    def _run(self) -> None:
        next_counts = time.monotonic()
        while not self._stop.is_set():
            if self._cycle.is_set():
                self._power_on()
                self._cycle.clear()
                self._cycled.set()
            socks = [self._listen, self._listen_counts, *self._clients, *self._counts_clients]
            ready, _, _ = select.select(socks, [], [], 0.005)
            for s in ready:
                if s is self._listen:
                    conn, _ = s.accept()
                    self._clients.append(conn)
                    self._rx[conn] = b""
                elif s is self._listen_counts:
                    self._counts_clients.append(s.accept()[0])
                elif s in self._clients:
                    self._serve(s)
                else:  # a counts client sent something or closed
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        self._counts_clients.remove(s)
                        s.close()
            if time.monotonic() >= next_counts:
                with self._lock:
                    period_s = self.state.period_ms / 1e3
                    line = self._counts_line(period_s)
                next_counts = time.monotonic() + period_s
                for c in list(self._counts_clients):
                    try:
                        c.sendall(line)
                    except OSError:
                        self._counts_clients.remove(c)
                        c.close()

    def _counts_line(self, period_s: float) -> bytes:
        counts = [
            int(self._rng.poisson(self.rate_hz(k) * period_s)) for k in range(self.state.detectors)
        ]
        return (f"{time.time() * 1e3:.0f}," + ",".join(map(str, counts)) + "\n").encode()

    def _close_all(self) -> None:
        for s in [*self._clients, *self._counts_clients]:
            s.close()
        self._clients.clear()
        self._counts_clients.clear()
        self._rx.clear()

    def _serve(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._clients.remove(conn)
            self._rx.pop(conn, None)
            conn.close()
            return
        buf = self._rx[conn] + data
        try:
            messages = parse_objects(buf.decode("utf-8"))
            self._rx[conn] = b""
        except (UnicodeDecodeError, ValueError):
            self._rx[conn] = buf  # incomplete: wait for the rest
            if len(buf) > 65536:
                self._rx[conn] = b""
            return
        for message in messages:
            with self._lock:
                self.requests_seen += 1
                fault = self._take_fault("drop", "no_reply", "garble", "error")
                if fault == "drop":
                    self._close_all()
                    return
                if fault == "no_reply":
                    continue
                replies = self._handle(message)
                if fault == "garble":
                    replies = [b"<html>\xff not json"]
                elif fault == "error":
                    replies = [json.dumps({"label": "ErrorMessage", "value": "busy"}).encode()]
            try:
                conn.sendall(b"".join(r + ETB for r in replies))
            except OSError:
                return

    def _label(self, label: str, value: Any, props: bool = False) -> bytes:
        return json.dumps({"label": label, "value": {"value": value} if props else value}).encode()

    def _all_labels(self) -> dict[str, Any]:
        st = self.state
        return {
            "NumberOfDetectors": st.detectors,
            "BiasCurrent": st.bias_ua,
            "TriggerLevel": st.trigger_mv,
            "DetectorEnable": st.enabled,
            "InptMeasurementPeriod": st.period_ms,
        }

    def _handle(self, message: Any) -> list[bytes]:
        if not isinstance(message, dict):
            return [self._label("ErrorMessage", "message is not an object")]
        st = self.state
        request, command, value = (
            message.get("request"),
            message.get("command"),
            message.get("value"),
        )
        if request == "labelProps":
            return [self._label(k, v, props=True) for k, v in self._all_labels().items()]
        if request == "BiasVoltage":
            return [self._label("BiasVoltage", self._bias_voltage_mv())]
        if request == "TemperatureHistory":
            memory = {
                "T": [self.stage_temperature_k] * 3,
                "T2": [40.1] * 3,
                "x": ["07-Dec-26 06:00:00.000"] * 3,
                "V_avrg": [0.0] * 3,
                "BoardTemp1": [30.0] * 3,
                "BoardTemp2": [31.0] * 3,
            }
            return [self._label("temperature_long_memory", memory)]
        if command in ("SetAllBiasCurrents", "SetAllTriggerLevels"):
            lo, hi = (-90.9, 90.9) if command == "SetAllBiasCurrents" else (-1000.0, 1000.0)
            if (
                not isinstance(value, list)
                or len(value) != st.detectors
                or not all(isinstance(v, int | float) and lo <= v <= hi for v in value)
            ):
                return [self._label("ErrorMessage", f"{command}: bad value {value!r}")]
            if command == "SetAllBiasCurrents":
                st.bias_ua = [min(float(v), self.bias_limit_ua) for v in value]
                self._update_latches()
                return [self._label("BiasCurrent", st.bias_ua)]
            st.trigger_mv = [float(v) for v in value]
            return [self._label("TriggerLevel", st.trigger_mv)]
        if command == "DetectorEnable" and isinstance(value, bool):
            st.enabled = value
            self._update_latches()
            return [self._label("DetectorEnable", st.enabled)]
        if command == "SetMeasurementPeriod" and isinstance(value, int) and 10 <= value <= 60_000:
            st.period_ms = value
            return [self._label("InptMeasurementPeriod", st.period_ms)]
        return [self._label("ErrorMessage", f"cannot handle {message!r}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated Single Quantum SNSPD controller")
    parser.add_argument("--detectors", type=int, default=4, help="number of detectors")
    args = parser.parse_args(argv)
    with SingleQuantumSim(detectors=args.detectors) as sim:
        print(f"{sim.url} counts_port={sim.counts_port}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
