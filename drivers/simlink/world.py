"""The simulated link as two worlds, one per process, joined by a simulated fiber.

* :class:`TransmitterWorld` (source, encoder, attenuation, and the fiber with whatever
  sits on it: loss, eavesdropper, polarisation misalignment and drift, propagation delay)
  generates the pulses that reach the fiber's far end, chunk by chunk, and PUSHes them over
  a ZeroMQ socket bound to ``fiber_endpoint``.
* :class:`ReceiverWorld` PULLs them, applies the receiver physics
  (:mod:`drivers.simlink.receiver`) and queues time-tag blocks for the simulated tagger.

Each world is built from its side's parameters only
(:class:`~drivers.simlink.params.TransmitterSimParams`,
:class:`~drivers.simlink.params.ReceiverSimParams`) and draws its own box's hardware
truths (:mod:`drivers.simlink.truths`). The receiver learns about the transmitted states
only through the photons, and a fiber batch carries only what light carries: per pulse
its slot (the public slot numbering, i.e. its timing), its polarisation angle and its
photon number (:data:`~drivers.simlink.source.PHOTON_DTYPE`); the batch header gives the
pulse rate, the arrival time of its first slot and the fiber's polarisation rotation
over the batch (:meth:`TransmitterWorld.fiber_header`): a pulse's polarisation at the
fiber's end is its angle turned by that rotation, so angle and rotation together are
its state, which is what the light carries.
No basis, bit or intensity label, no seed, no transmitter truth.

Both worlds advance in chunks of ``chunk_slots`` slots with counter-based seeds
``(seed, chunk index)``, so the same seed gives the same tags however the chunks are
paced: with wall-clock time (:meth:`start`, for the daemons) or as fast as possible
(:meth:`TransmitterWorld.run_for`, for tests and benchmarks).

A process holds one world per simulated link it takes part in, each under the link's
name (``""`` for a process on one link): :func:`start_world`, :func:`get_world`,
:func:`stop_world`. The simulated instruments (:mod:`drivers.simlink.instruments`) are
views of one of them (their ``resource`` names it).

Faults (``inject(fault, **kw)`` / ``clear(fault)``): ``fiber_cut``, ``encoding_drift``
(``angle_rad``: step of the polarisation reference), ``polarization_jump``
(transmitter, one-shot: the fiber is touched, its SU(2) rotation jumps by ``angle_rad``,
default 1 rad on the Poincaré sphere, about a random axis), ``eve`` (``fraction``, ``mode``),
``bright_light`` (receiver: detectors latch), ``detector_disconnect`` (receiver:
detector drivers raise ConnectionLostError) and ``clock_step`` (receiver, one-shot: the
time tagger's clock jumps by ``step_ps`` picoseconds, default one microsecond, as when its
reference clock glitches or is switched; clearing it does nothing).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zmq

from drivers.interfaces import TAG_DTYPE, PreparedStates, TagBlock
from drivers.poincare import rotation_about
from drivers.simlink.optics import TxOptics
from drivers.simlink.params import (
    PolarizationDriftParams,
    ReceiverSimParams,
    TransmitterSimParams,
)
from drivers.simlink.polarization import ControllerModel, FiberPolarization
from drivers.simlink.receiver import (
    N_CHANNELS,
    DetectionRecords,
    DetectorSettings,
    ReceiverModel,
    copy_photons,
    span_ps,
)
from drivers.simlink.satellite_channel import BatchChannel, SatelliteChannel
from drivers.simlink.source import (
    PHOTON_DTYPE,
    EmissionSettings,
    PhotonChunk,
    generate_photons,
    intercept_resend,
    secret_key,
    slot_choices,
)
from drivers.simlink.truths import resolve_receiver, resolve_transmitter

__all__ = [
    "FAULTS",
    "FIBER_HEADER_KEYS",
    "ReceiverWorld",
    "TransmitterWorld",
    "World",
    "get_world",
    "start_world",
    "stop_world",
    "synthetic_batch",
    "warm_up",
    "warm_up_receiver",
    "warm_up_transmitter",
]

log = logging.getLogger(__name__)

FAULTS = (
    "fiber_cut",
    "encoding_drift",
    "eve",
    "bright_light",
    "detector_disconnect",
    "clock_step",
    "polarization_jump",
)
#: a clock step without ``step_ps``: one microsecond forward
DEFAULT_CLOCK_STEP_PS = 1_000_000
FIBER_PROTOCOL_VERSION = 3
#: The keys of a fiber batch's header: everything the receiver learns besides the photons.
FIBER_HEADER_KEYS = frozenset(
    {"v", "run", "chunk", "slot_start", "slot_stop", "slot_rate_hz", "t0_ps", "rotation"}
)
#: how far from orthogonal a header's rotation may be (float round-off of the sender)
_ROTATION_TOLERANCE = 1e-6
_IDENTITY9 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_STREAM_TX_PHYSICS = 1
_STREAM_RX_PHYSICS = 2
_STREAM_RX_EVE = 3
_STREAM_TX_EVE = 4
_STREAM_TX_FIBER = 5
_STREAM_TX_POLARIZATION = 6
_STREAM_TX_DRIFT = 7
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_STREAMS_DOMAIN = 0x7369_6D6C_696E_6B31  # "simlink1"


def _is_rotation(value: Any) -> bool:
    """Whether ``value`` is nine finite numbers forming a 3x3 rotation (row-major)."""
    if not isinstance(value, list) or len(value) != 9:
        return False
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        return False
    m = np.asarray(value, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(m)):
        return False
    return bool(
        np.max(np.abs(m @ m.T - np.eye(3))) < _ROTATION_TOLERANCE
        and abs(float(np.linalg.det(m)) - 1.0) < _ROTATION_TOLERANCE
    )


def _splitmix64(z: int) -> int:
    """The SplitMix64 finaliser on a Python int (the same as the kernels' ``_mix``)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class ChunkStreams:
    """Counter-based random streams of one world: chunk ``index`` of stream ``stream``
    gets the same numbers however the chunks are paced.

    :meth:`word` is a 64-bit seed for a kernel; :meth:`generator` reseeds one PCG64 from
    four such words and returns it (a microsecond, where a fresh
    ``numpy.random.default_rng`` hashes a seed sequence for tens of microseconds, per
    chunk and side). The generator is shared: a chunk is done with it before the next
    chunk asks."""

    def __init__(self, seed: int) -> None:
        # a domain constant: the root differs from the transmitter's secret choice key
        # (``source.secret_key``, the same finaliser on the bare seed)
        self._root = _splitmix64(((seed ^ _STREAMS_DOMAIN) + _GOLDEN64) & _MASK64)
        self._bits = np.random.PCG64(0)
        self._generator = np.random.Generator(self._bits)
        self._state = self._bits.state

    def word(self, stream: int, index: int, k: int = 0) -> int:
        """Word ``k`` (64 bits) of chunk ``index`` of ``stream``."""
        return self._words(stream, index, k + 1)[k]

    def _words(self, stream: int, index: int, n: int) -> list[int]:
        z = _splitmix64(((self._root ^ stream) + _GOLDEN64) & _MASK64)
        z = _splitmix64(((z ^ (index & _MASK64)) + _GOLDEN64) & _MASK64)
        return [_splitmix64((z + (k + 1) * _GOLDEN64) & _MASK64) for k in range(n)]

    def generator(self, stream: int, index: int) -> np.random.Generator:
        """The shared generator, reseeded for chunk ``index`` of ``stream``."""
        w = self._words(stream, index, 4)
        state = self._state
        state["state"] = {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3] | 1}
        state["has_uint32"] = 0
        state["uinteger"] = 0
        self._bits.state = state
        return self._generator


#: Overlap (ps) of consecutive batches still taken as joined (rounding of their times).
_JOIN_PS = 4


@functools.lru_cache(maxsize=64)
def _slot_period_ps(slot_rate_hz: float) -> Fraction:
    return Fraction(10**12) / Fraction(slot_rate_hz)


def _bernoulli_indices(rng: np.random.Generator, n: int, p: float) -> npt.NDArray[np.int64]:
    """The indices in ``[0, n)`` each chosen independently with probability ``p``, from
    geometric gaps (cost proportional to the number chosen, not to ``n``)."""
    parts = []
    last = -1
    while last < n:
        size = int(n * p + 6.0 * math.sqrt(n * p)) + 16
        gaps = rng.geometric(p, size=size)
        idx = last + np.cumsum(gaps, dtype=np.int64)
        parts.append(idx)
        last = int(idx[-1])
    chosen = np.concatenate(parts)
    return chosen[chosen < n]


class TransmitterWorld:
    """Source, encoder and attenuation of the transmitter, and the fiber with the
    eavesdropper. ``hardware`` holds the box's drawn truths.

    Thread-safe: instrument calls and the pacing thread share ``lock``.
    """

    role: Literal["transmitter"] = "transmitter"

    def __init__(
        self,
        params: TransmitterSimParams,
        fiber_endpoint: str | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if not isinstance(params, TransmitterSimParams):
            raise TypeError(
                "a transmitter world is built from the transmitter's side of the simulation "
                f"(TransmitterSimParams), not from {type(params).__name__}"
            )
        params = resolve_transmitter(params)
        self.source = params.source
        self.fiber = params.fiber
        self.hardware = params.hardware
        self.chunk_slots = params.chunk_slots
        self._fiber_delay_ps = round(params.fiber.delay_s * 1e12)
        # Satellite passes in place of the fiber's fixed loss and delay; their wall-clock
        # times map to slots through epoch_unix_s, the Unix time of slot 0 (set again when
        # the world starts pacing).
        self.satellite = (
            SatelliteChannel(params.satellite) if params.satellite is not None else None
        )
        self.epoch_unix_s = time.time()
        self._fiber_drift_rad = 0.0
        #: the fiber's SU(2) rotation (None: the fiber turns states about S3 only)
        self.polarization = (
            FiberPolarization(params.fiber.polarization)
            if params.fiber.polarization is not None
            else None
        )
        self._pending_jumps: list[float] = []
        #: the rotation of each chunk not yet sent (its header carries it)
        self._chunk_rotation: dict[int, tuple[float, ...]] = {}
        self._eve_mode = params.eve.mode
        self._eve_fraction = params.eve.fraction
        self._seed = params.transmitter_seed
        self._key = secret_key(params.transmitter_seed)
        self._streams = ChunkStreams(params.transmitter_seed)
        self.optics = TxOptics.power_on(self.hardware, self.source, params.start_calibrated)
        self.lock = threading.RLock()
        self.chunk_index = 0
        self.faults: dict[str, dict[str, Any]] = {}
        # (first slot, sync seed or None, (p_signal, p_decoy, p_basis_z)) in force from
        # that slot on
        self._sync_history: list[tuple[int, int | None, tuple[float, float, float]]] = [
            (0, None, (self.source.p_signal, self.source.p_decoy, self.source.p_basis_z))
        ]
        self.eve_known_slots: list[npt.NDArray[np.int64]] = []
        self.photons_sent = 0
        self.chunks_dropped = 0
        self._run_id = int.from_bytes(np.random.default_rng().bytes(4), "little")
        self._ctx = context
        self._own_ctx = context is None
        self._sock: zmq.Socket[Any] | None = None
        if fiber_endpoint is not None:
            self._ctx = self._ctx or zmq.Context()
            self._sock = self._ctx.socket(zmq.PUSH)
            self._sock.setsockopt(zmq.SNDHWM, 32)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.bind(fiber_endpoint)
            # the real endpoint when bound to port "*"
            fiber_endpoint = str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.fiber_endpoint = fiber_endpoint
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- state the instruments see ---------------------------------------------------
    @property
    def reference_angle_rad(self) -> float:
        """Simulation truth (tests): how far the fiber has turned every state about
        ``S3`` (``drift_rad_per_sqrt_s``, real space), on top of its SU(2) rotation."""
        return self._fiber_drift_rad

    @property
    def next_slot(self) -> int:
        return self.chunk_index * self.chunk_slots

    def slot_rate_hz(self) -> float:
        return self.source.slot_rate_hz

    def _regime_from_next_slot(self, seed: int | None, probs: tuple[float, float, float]) -> int:
        start = self.next_slot
        if self._sync_history[-1][0] == start:
            self._sync_history[-1] = (start, seed, probs)
        else:
            self._sync_history.append((start, seed, probs))
        return start

    def set_sync_pattern(self, public_seed: int | None) -> int:
        """Switch to/from the public sync pattern from the next chunk on; returns its first slot."""
        with self.lock:
            return self._regime_from_next_slot(public_seed, self._sync_history[-1][2])

    def class_probabilities(self) -> tuple[float, float, float]:
        with self.lock:
            return self._sync_history[-1][2]

    def set_class_probabilities(self, p_signal: float, p_decoy: float, p_basis_z: float) -> int:
        """New class and basis probabilities from the next chunk on; returns its first slot."""
        with self.lock:
            return self._regime_from_next_slot(
                self._sync_history[-1][1], (float(p_signal), float(p_decoy), float(p_basis_z))
            )

    def sync_seed_at(self, slot: int) -> int | None:
        with self.lock:
            for first, seed, _ in reversed(self._sync_history):
                if slot >= first:
                    return seed
        return None

    def prepared(self, slot_index: npt.NDArray[np.int64]) -> PreparedStates:
        """Basis, bit and intensity class of ``slot_index`` (secret; never logged)."""
        slots = np.asarray(slot_index, dtype=np.int64)
        with self.lock:
            history = list(self._sync_history)
        basis = np.empty(slots.shape, np.uint8)
        bit = np.empty(slots.shape, np.uint8)
        intensity = np.empty(slots.shape, np.uint8)
        firsts = np.array([h[0] for h in history], dtype=np.int64)
        regime = np.searchsorted(firsts, slots, side="right") - 1
        for r, (_, seed, (p_signal, p_decoy, p_basis_z)) in enumerate(history):
            sel = regime == r
            if sel.any():
                b, t, i = slot_choices(
                    self._key,
                    slots[sel],
                    p_signal=p_signal,
                    p_decoy=p_decoy,
                    p_basis_z=p_basis_z,
                    sync_seed=seed,
                )
                basis[sel], bit[sel], intensity[sel] = b, t, i
        return PreparedStates(basis=basis, bit=bit, intensity=intensity)

    def mu_per_class(self) -> tuple[float, float, float]:
        with self.lock:
            return self.optics.mu_per_class(self.hardware, self.source.slot_rate_hz)

    def emission_settings(self) -> EmissionSettings:
        """What the next chunk emits, from the instruments' settings and the faults."""
        with self.lock:
            if "fiber_cut" in self.faults:
                transmittance = 0.0
            elif self.satellite is not None:
                transmittance = self._batch_channel(self.chunk_index).transmittance
            else:
                transmittance = self.fiber.transmittance
            angles = self.optics.state_angles_rad(self.hardware)
            step = float(self.faults.get("encoding_drift", {}).get("angle_rad", 0.0))
            eve = self.faults.get("eve")
            mode = str(eve.get("mode", "intercept-resend")) if eve else self._eve_mode
            fraction = float(eve.get("fraction", 1.0)) if eve else self._eve_fraction
            return EmissionSettings(
                mu_per_class=self.optics.mu_per_class(self.hardware, self.source.slot_rate_hz),
                p_signal=self._sync_history[-1][2][0],
                p_decoy=self._sync_history[-1][2][1],
                p_basis_z=self._sync_history[-1][2][2],
                transmittance=transmittance,
                state_angle_rad=(
                    angles[0] + step,
                    angles[1] + step,
                    angles[2] + step,
                    angles[3] + step,
                ),
                sync_seed=self.sync_seed_at(self.next_slot),
                eve_mode=mode,
                eve_fraction=fraction,
            )

    def power_meter_w(self, rng: np.random.Generator) -> float:
        with self.lock:
            p_s, p_d, _ = self._sync_history[-1][2]
            p_class = (p_s, p_d, max(0.0, 1.0 - p_s - p_d))
            true_w = self.optics.meter_power_w(self.hardware, p_class)
        return true_w + float(rng.normal(0.0, self.hardware.power_meter_noise_w))

    # --- faults -----------------------------------------------------------------------
    def inject(self, fault: str, **kw: Any) -> None:
        """Start a fault (see the module docstring); receiver-only faults are refused."""
        if fault not in ("fiber_cut", "encoding_drift", "eve", "polarization_jump"):
            raise ValueError(f"transmitter world: unknown or receiver-side fault {fault!r}")
        with self.lock:
            if fault == "polarization_jump":
                angle = kw.get("angle_rad")
                self._pending_jumps.append(1.0 if angle is None else float(angle))
            else:
                self.faults[fault] = dict(kw)
        log.warning("simlink fault injected: %s %s", fault, kw)

    def clear(self, fault: str) -> None:
        with self.lock:
            self.faults.pop(fault, None)
        log.info("simlink fault cleared: %s", fault)

    # --- stepping -----------------------------------------------------------------------
    def _advance_drift(self, index: int) -> None:
        """The hardware drifts over chunk ``index`` (before it is emitted; lock held)."""
        d = self.hardware.drift
        if not d.any:
            return
        dt_s = self.chunk_slots / self.source.slot_rate_hz
        o = self.optics
        o.im_bias_drift_v += d.im_bias_v_per_s * dt_s
        if d.im_bias_walk_v_per_sqrt_s > 0:
            rng = self._streams.generator(_STREAM_TX_DRIFT, index)
            o.im_bias_drift_v += float(rng.normal(0.0, d.im_bias_walk_v_per_sqrt_s * dt_s**0.5))
        o.laser_drift_db += d.laser_power_db_per_s * dt_s
        o.meter_gain_drift += d.power_meter_gain_per_s * dt_s

    def _next_chunk(self) -> tuple[int, PhotonChunk]:
        with self.lock:
            self._advance_drift(self.chunk_index)
            settings = self.emission_settings()
            index = self.chunk_index
            self.chunk_index += 1
        start = index * self.chunk_slots
        chunk = generate_photons(
            self._key,
            start,
            start + self.chunk_slots,
            settings,
            np.uint64(self._streams.word(_STREAM_TX_PHYSICS, index)),
            eve_rng=lambda: np.random.default_rng([self._seed, _STREAM_TX_EVE, index]),
        )
        self._through_fiber(index, chunk)
        if chunk.eve_known_slots.size:
            self.eve_known_slots.append(chunk.eve_known_slots)
        self.photons_sent += chunk.photons.shape[0]
        return index, chunk

    def _through_fiber(self, index: int, chunk: PhotonChunk) -> None:
        """The fiber's effects on the polarisation of the pulses that crossed it (its loss
        is in the emission): the drift of the reference, a random walk stepped per chunk,
        and the misalignment: with probability ``e_d`` a pulse leaves turned by 90
        degrees, which flips its outcome in both bases."""
        fiber = self.fiber
        rng = self._streams.generator(_STREAM_TX_FIBER, index)
        dt_s = (chunk.slot_stop - chunk.slot_start) / self.source.slot_rate_hz
        if fiber.drift_rad_per_sqrt_s > 0:
            self._fiber_drift_rad += rng.normal(0.0, fiber.drift_rad_per_sqrt_s * math.sqrt(dt_s))
        self._chunk_rotation[index] = self._advance_polarization(index, dt_s)
        self._chunk_rotation.pop(index - 64, None)  # headers are built right after
        photons = chunk.photons
        if photons.shape[0] == 0:
            return
        angle = photons["angle_rad"]
        if self._fiber_drift_rad != 0.0:
            angle += np.float32(self._fiber_drift_rad)
        if fiber.misalignment > 0:
            turned = _bernoulli_indices(rng, photons.shape[0], fiber.misalignment)
            angle[turned] += np.float32(math.pi / 2)

    def _advance_polarization(self, index: int, dt_s: float) -> tuple[float, ...]:
        """The fiber's SU(2) rotation over chunk ``index`` (row-major 3x3): the state at
        the chunk's start, then advanced by its duration (drift, scheduled jumps) and by
        any injected jump."""
        with self.lock:
            jumps, self._pending_jumps = self._pending_jumps, []
        if self.polarization is None and not jumps:
            return _IDENTITY9
        if self.polarization is None:
            # an injected jump on a fiber without a drift model: a frozen SU(2) fiber
            self.polarization = FiberPolarization(PolarizationDriftParams(drift_rad_per_sqrt_s=0.0))
        pol = self.polarization
        rotation = tuple(float(x) for x in pol.matrix.reshape(9))
        rng = self._streams.generator(_STREAM_TX_POLARIZATION, index)
        pol.advance(dt_s, rng)
        for angle in jumps:
            pol.matrix = rotation_about(rng.normal(size=3), angle) @ pol.matrix
            pol.jumps += 1
        return rotation

    def step(self) -> PhotonChunk:
        """Simulate the next chunk and send it down the fiber without blocking (a chunk
        nobody pulls is lost, like light into an open connector)."""
        index, chunk = self._next_chunk()
        self._send(index, chunk)
        return chunk

    def _batch_channel(self, index: int) -> BatchChannel:
        """The satellite channel over batch ``index`` (only with ``satellite`` set)."""
        assert self.satellite is not None
        rate = self.source.slot_rate_hz
        start = self.epoch_unix_s + index * self.chunk_slots / rate
        return self.satellite.batch(start, start + self.chunk_slots / rate)

    def fiber_header(self, index: int, chunk: PhotonChunk) -> dict[str, Any]:
        """The public header of a fiber batch: what the light itself tells the receiver.

        The batch's slots ``[slot_start, slot_stop)`` at ``slot_rate_hz`` (the pulse
        train's timing) and ``t0_ps``, the arrival time of slot ``slot_start``'s pulse edge
        at the fiber's end on the transmitter's slot clock (emission plus propagation);
        ``run`` changes when the transmitter restarts, ``chunk`` numbers the batches."""
        period = _slot_period_ps(self.source.slot_rate_hz)
        delay_ps, arrival_rate_hz = self._fiber_delay_ps, self.source.slot_rate_hz
        if self.satellite is not None:
            # The time of flight changes along the batch: its pulses arrive at the rate
            # the Doppler effect gives (linear between the batch's ends).
            ch = self._batch_channel(index)
            n = chunk.slot_stop - chunk.slot_start
            delay_ps = round(ch.tof_start_s * 1e12)
            span_ps = float(n * period) + (ch.tof_stop_s - ch.tof_start_s) * 1e12
            arrival_rate_hz = n * 1e12 / span_ps
        return {
            "v": FIBER_PROTOCOL_VERSION,
            "run": self._run_id,
            "chunk": index,
            "slot_start": chunk.slot_start,
            "slot_stop": chunk.slot_stop,
            "slot_rate_hz": arrival_rate_hz,
            "t0_ps": round(chunk.slot_start * period) + delay_ps,
            "rotation": list(self._chunk_rotation.get(index, _IDENTITY9)),
        }

    def _send(self, index: int, chunk: PhotonChunk, block: bool = False) -> None:
        if self._sock is None:
            return
        header = self.fiber_header(index, chunk)
        frames = [json.dumps(header).encode(), chunk.photons.tobytes()]
        try:
            self._sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.chunks_dropped += 1  # nobody at the other end of the fiber
            if self.chunks_dropped & (self.chunks_dropped - 1) == 0:  # 1, 2, 4, 8, ...
                # a few while the receiver's process starts; many: light lost on the way
                log.log(
                    logging.WARNING if self.chunks_dropped > 32 else logging.INFO,
                    "fiber: %d batches dropped so far (no receiver pulling, or one too slow)",
                    self.chunks_dropped,
                )

    def run_for(self, seconds: float, send_timeout_s: float = 10.0) -> list[PhotonChunk]:
        """Simulate ``seconds`` of link time as fast as possible (tests, benchmarks).

        Sends block up to ``send_timeout_s`` per chunk (a receiver must be pulling).
        """
        n = max(1, math.ceil(seconds * self.source.slot_rate_hz / self.chunk_slots))
        out = []
        if self._sock is not None:
            self._sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        for _ in range(n):
            index, chunk = self._next_chunk()
            if self._sock is not None:
                try:
                    self._send(index, chunk, block=True)
                except zmq.Again as exc:
                    raise TimeoutError("fiber: no receiver pulled the photons") from exc
            out.append(chunk)
        return out

    # --- real-time pacing ---------------------------------------------------------------
    def start(self) -> None:
        """Advance with wall-clock time in a background thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self.epoch_unix_s = time.time() - self.next_slot / self.source.slot_rate_hz
        self._thread = threading.Thread(target=self._pace, name="simlink-tx", daemon=True)
        self._thread.start()

    def _pace(self) -> None:
        t0 = time.monotonic() - self.next_slot / self.source.slot_rate_hz
        chunk_s = self.chunk_slots / self.source.slot_rate_hz
        warn_at_s = 1.0
        while not self._stop.is_set():
            due = t0 + (self.chunk_index + 1) * chunk_s
            wait = due - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            if -wait > warn_at_s:
                # the link runs slower than its slot rate: the process lacks CPU
                log.warning("simulated link %.1f s behind wall-clock time", -wait)
                warn_at_s *= 2
            try:
                self.step()
            except Exception:
                log.exception("simlink transmitter world: chunk failed")
                self._stop.wait(chunk_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None


@dataclass
class DetectorState:
    """What the detector front panels show, per channel."""

    armed: npt.NDArray[np.bool_]
    latched: npt.NDArray[np.bool_]
    efficiency_pct: npt.NDArray[np.float64]
    dead_time_ns: npt.NDArray[np.float64]
    delay_ps: npt.NDArray[np.float64]
    threshold_v: npt.NDArray[np.float64]


class ReceiverWorld:
    """Receiver optics, detectors and time tagger, built from the receiver's side of the
    simulation only. ``rx`` and ``clock_params`` hold the box's drawn truths."""

    role: Literal["receiver"] = "receiver"

    def __init__(
        self,
        params: ReceiverSimParams,
        fiber_endpoint: str | None = None,
        context: zmq.Context[Any] | None = None,
        max_buffered_tags: int = 20_000_000,
    ) -> None:
        if not isinstance(params, ReceiverSimParams):
            raise TypeError(
                "a receiver world is built from the receiver's side of the simulation "
                f"(ReceiverSimParams), not from {type(params).__name__}"
            )
        # the front panels show the datasheet efficiency; the detectors have their truths
        self.nominal_efficiency_pct = float(100.0 * np.mean(params.hardware.detector_efficiency))
        params = resolve_receiver(params)
        rx = params.hardware
        self.rx = rx
        self.clock_params = params.clock
        self._seed = params.receiver_seed
        self._streams = ChunkStreams(params.receiver_seed)
        self.model = ReceiverModel(rx, params.clock)
        calibrated = params.start_calibrated
        mid_threshold = sum(rx.threshold_window_v) / 2
        self.detectors = DetectorState(
            armed=np.full(N_CHANNELS, calibrated),
            latched=np.zeros(N_CHANNELS, np.bool_),
            efficiency_pct=np.full(N_CHANNELS, self.nominal_efficiency_pct),
            dead_time_ns=np.full(N_CHANNELS, rx.dead_time_ns),
            delay_ps=np.full(N_CHANNELS, rx.true_delay_ps if calibrated else 0.0),
            threshold_v=np.full(N_CHANNELS, mid_threshold),
        )
        self.tagger_delay_ps = np.zeros(N_CHANNELS, np.int64)
        #: the factor on the dark rates in the last batch (``hardware.drift``; simulation
        #: truth, for tests)
        self.dark_factor = 1.0
        #: the receiver's polarisation controller, in front of the analysers (its driver
        #: sets the retardances; at power-on all zero, i.e. no rotation)
        self.polarization_controller = ControllerModel()
        #: the fiber's rotation in the last batch (simulation truth, for tests)
        self.last_fiber_rotation = np.eye(3)
        self._settings_cache: tuple[tuple[object, ...], DetectorSettings] | None = None
        self.lock = threading.RLock()
        self.faults: dict[str, dict[str, Any]] = {}
        self.chunk_index = 0
        self._run: int | None = None
        self._anchor_ps = 0
        self._true_end_ps = 0
        self.detections = 0
        self.last_counts = np.zeros(N_CHANNELS, np.int64)
        self.last_duration_s = 0.0
        #: :meth:`_reading_key` of the batch ``last_counts`` counted (None: no batch yet)
        self._counts_key: tuple[object, ...] | None = None
        #: (reading key, counts, seconds) of recent batches: the counters integrate over
        #: ``hardware.counter_integration_s`` of batches counted with the same settings
        self._count_history: collections.deque[
            tuple[tuple[object, ...], npt.NDArray[np.int64], float]
        ] = collections.deque(maxlen=4096)
        self._counter_integration_s = params.hardware.counter_integration_s
        self.streaming = False
        self.max_buffered_tags = max_buffered_tags
        self._blocks: collections.deque[TagBlock] = collections.deque()
        self._buffered = 0
        self._missed = 0
        self._tag_span_end_ps = 0  # tagger time where the last queued block's span ended
        self._blocks_ready = threading.Condition(self.lock)
        self._counts_ready = threading.Condition(self.lock)
        self._ctx = context
        self._own_ctx = context is None
        self._sock: zmq.Socket[Any] | None = None
        if fiber_endpoint is not None:
            self._ctx = self._ctx or zmq.Context()
            self._sock = self._ctx.socket(zmq.PULL)
            self._sock.setsockopt(zmq.RCVHWM, 32)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(fiber_endpoint)
        self.fiber_endpoint = fiber_endpoint
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- detector model --------------------------------------------------------------
    def detector_settings(self) -> DetectorSettings:
        """The physics-level settings implied by the front panels and the faults."""
        with self.lock:
            d = self.detectors
            rx = self.rx
            scale = d.efficiency_pct / self.nominal_efficiency_pct
            efficiency = np.minimum(np.asarray(rx.detector_efficiency) * scale, 1.0)
            dark = np.asarray(rx.dark_count_rates_hz) * scale**2
            low, high = rx.threshold_window_v
            noisy = d.threshold_v < low
            blind = d.threshold_v > high
            dark = np.where(noisy, dark * 1e3 + 1e5, np.where(blind, 0.0, dark))
            efficiency = np.where(blind, 0.0, efficiency)
            enabled = d.armed & ~d.latched & ("detector_disconnect" not in self.faults)
            return DetectorSettings(
                efficiency=efficiency.astype(np.float64),
                dark_rate_hz=np.asarray(dark, np.float64),
                enabled=enabled,
                delay_ps=d.delay_ps.copy(),
                dead_time_ps=d.dead_time_ns * 1e3,
                tagger_delay_ps=self.tagger_delay_ps.copy(),
            )

    def dark_rate_in_gates_hz(self, slot_rate_hz: float) -> float:
        """Simulation truth (tests): the dark clicks per second of the armed detectors in
        their gates (one per slot) now, with the drift's factor of the last batch: what
        their count-rate readings sum to with the light off."""
        settings = self.detector_settings()
        rates = np.where(settings.enabled, settings.dark_rate_hz, 0.0)
        gate_s = self.rx.gate_width_ps * 1e-12
        return float(rates.sum()) * self.dark_factor * gate_s * slot_rate_hz

    def _settings_key(self) -> tuple[object, ...]:
        """What :meth:`detector_settings` depends on: the front panels, the tagger's
        input delays and the faults that enter the settings."""
        d = self.detectors
        return (
            d.armed.tobytes(),
            d.latched.tobytes(),
            d.efficiency_pct.tobytes(),
            d.dead_time_ns.tobytes(),
            d.delay_ps.tobytes(),
            d.threshold_v.tobytes(),
            self.tagger_delay_ps.tobytes(),
            "detector_disconnect" in self.faults,
        )

    def _reading_key(self) -> tuple[object, ...]:
        """What a count-rate reading on this side depends on: the settings and every
        fault in force (the transmitter's light is the other process's)."""
        faults = tuple(sorted((name, repr(sorted(kw.items()))) for name, kw in self.faults.items()))
        return (self._settings_key(), faults)

    def _current_settings(self) -> DetectorSettings:
        """:meth:`detector_settings`, recomputed only when a front panel or a fault that
        enters it changed (the model then reuses the arrays it derived from them)."""
        key = self._settings_key()
        if self._settings_cache is None or self._settings_cache[0] != key:
            self._settings_cache = (key, self.detector_settings())
        return self._settings_cache[1]

    # --- faults -----------------------------------------------------------------------
    def inject(self, fault: str, **kw: Any) -> None:
        """Start a fault (see the module docstring)."""
        if fault not in FAULTS:
            raise ValueError(f"receiver world: unknown fault {fault!r} (known: {FAULTS})")
        if fault == "polarization_jump":
            raise ValueError("polarization_jump is the fiber's: inject it on the transmitter")
        with self.lock:
            if fault == "clock_step":
                self.model.clock.step(int(kw.get("step_ps", DEFAULT_CLOCK_STEP_PS)))
            else:
                self.faults[fault] = dict(kw)
            if fault == "bright_light":
                self.detectors.latched |= self.detectors.armed
        log.warning("simlink fault injected: %s %s", fault, kw)

    def clear(self, fault: str) -> None:
        with self.lock:
            self.faults.pop(fault, None)
        log.info("simlink fault cleared: %s", fault)

    # --- processing --------------------------------------------------------------------
    def process(self, header: dict[str, Any], photons: npt.NDArray[np.void]) -> DetectionRecords:
        """Apply the receiver physics to one fiber batch; queue its tags if streaming."""
        slot_start = int(header["slot_start"])
        slot_stop = int(header["slot_stop"])
        period = _slot_period_ps(float(header["slot_rate_hz"]))
        run = int(header["run"])
        tx_t0 = int(header["t0_ps"])
        with self.lock:
            # (A satellite's batches join to within the picosecond rounding of their
            # times of flight: not a jump back.)
            if run != self._run or self._anchor_ps + tx_t0 < self._true_end_ps - _JOIN_PS:
                # New transmitter run (or a jump back): continue the receiver's time line.
                self._anchor_ps = self._true_end_ps - tx_t0 if self._run is not None else 0
                self._run = run
            # joined within rounding: the batch starts where the last one ended
            chunk_t0 = max(self._anchor_ps + tx_t0, self._true_end_ps)
            if "bright_light" in self.faults:
                self.detectors.latched |= self.detectors.armed
            settings = self._current_settings()
            reading_key = self._reading_key()
            rotation = float(self.faults.get("encoding_drift", {}).get("angle_rad", 0.0))
            fiber = np.asarray(header.get("rotation", _IDENTITY9), dtype=np.float64).reshape(3, 3)
            self.last_fiber_rotation = fiber
            to_analysers = self.polarization_controller.matrix() @ fiber
            cut = "fiber_cut" in self.faults
            eve = self.faults.get("eve")
            index = self.chunk_index
            self.chunk_index += 1
            dark_factor = self.rx.drift.dark_factor(chunk_t0 * 1e-12)
            self.dark_factor = dark_factor
        if cut:
            photons = photons[:0]
        if eve:
            eve_rng = np.random.default_rng([self._seed, _STREAM_RX_EVE, index])
            photons = copy_photons(photons)  # private: the caller's batch stays as sent
            photons["angle_rad"] = intercept_resend(
                photons["angle_rad"], float(eve.get("fraction", 1.0)), eve_rng
            )
        rng = self._streams.generator(_STREAM_RX_PHYSICS, index)
        records = self.model.process(
            photons,
            slot_start,
            slot_stop,
            chunk_t0_ps=chunk_t0,
            period_ps=period,
            settings=settings,
            rng=rng,
            extra_rotation_rad=rotation,
            rotation=to_analysers,
            dark_factor=dark_factor,
        )
        duration_s = float((slot_stop - slot_start) * period) * 1e-12
        with self.lock:
            self._true_end_ps = chunk_t0 + span_ps(slot_stop - slot_start, period)
            self.detections += len(records)
            self.last_counts = self.model.last_counts
            self.last_duration_s = duration_s
            self._counts_key = reading_key
            self._count_history.append((reading_key, self.last_counts.copy(), duration_s))
            self._counts_ready.notify_all()
            if self.streaming:
                self._queue(records, chunk_t0, self._true_end_ps - chunk_t0)
        return records

    def _queue(self, records: DetectionRecords, chunk_t0_ps: int, duration_ps: int) -> None:
        """Queue the chunk's tags as one block spanning the chunk's whole duration on the
        tagger's clock (empty chunks too: a block of no tags over a known span is news)."""
        n = len(records)
        if self._buffered + n > self.max_buffered_tags:
            self._missed += n
            return
        tags = np.empty(n, dtype=TAG_DTYPE)
        tags["channel"] = records.channel
        tags["time_ps"] = records.time_ps
        if n:  # the tagger time of the chunk's start: the first tag less its delay in it
            start = int(records.time_ps[0]) - int(records.true_time_ps[0] - chunk_t0_ps)
        else:
            start = self._tag_span_end_ps
        stop = start + int(duration_ps)
        self._tag_span_end_ps = stop
        block = TagBlock(
            tags=tags,
            overflow=self._missed > 0,
            missed_events=self._missed,
            start_ps=start,
            stop_ps=stop,
        )
        self._missed = 0
        self._blocks.append(block)
        self._buffered += n
        self._blocks_ready.notify_all()

    def receive(self, timeout_s: float) -> DetectionRecords | None:
        """Pull and process one fiber batch; None when none arrived within ``timeout_s``."""
        if self._sock is None:
            raise RuntimeError("receiver world has no fiber endpoint")
        if not self._sock.poll(int(timeout_s * 1000)):
            return None
        frames = self._sock.recv_multipart()
        if len(frames) != 2:
            log.warning("fiber: dropped a message of %d frames", len(frames))
            return None
        header = json.loads(frames[0])
        if not isinstance(header, dict) or header.get("v") != FIBER_PROTOCOL_VERSION:
            version = header.get("v") if isinstance(header, dict) else None
            log.warning("fiber: dropped a message of version %r", version)
            return None
        if set(header) != FIBER_HEADER_KEYS or len(frames[1]) % PHOTON_DTYPE.itemsize:
            # a fiber carries light and its timing, nothing else
            log.warning("fiber: dropped a batch with header keys %s", sorted(header))
            return None
        if not _is_rotation(header["rotation"]):
            # a lossless fiber is unitary: anything else is not light
            log.warning("fiber: dropped a batch whose polarisation rotation is not one")
            return None
        photons = np.frombuffer(frames[1], dtype=PHOTON_DTYPE)
        return self.process(header, photons)

    # --- tagger stream --------------------------------------------------------------------
    def start_stream(self) -> None:
        with self.lock:
            self._blocks.clear()
            self._buffered = 0
            self._missed = 0
            self.streaming = True

    def stop_stream(self) -> None:
        with self.lock:
            self.streaming = False

    def read_block(self, timeout_s: float) -> TagBlock | None:
        """Next queued tag block, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._blocks_ready:
            while not self._blocks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._blocks_ready.wait(remaining)
            block = self._blocks.popleft()
            self._buffered -= len(block)
            return block

    def counter_integration_s(self) -> float:
        """The counters' integration period, in s: ``hardware.counter_integration_s``, at
        least one simulated batch (the last one's duration; 0 before the first). A
        reading taken at least this long after a setting change counts this long."""
        with self._counts_ready:
            return max(self._counter_integration_s, self.last_duration_s)

    def count_rates_hz(self, fresh_within_s: float = 0.0) -> npt.NDArray[np.float64]:
        """Click rate per channel over the detectors' integration period: the last batch,
        or the most recent batches counted with the settings now in force up to
        ``counter_integration_s`` (the receiver's hardware parameter; a slow link's counters
        must integrate longer than a batch to count anything).

        A batch is simulated with the settings in force when it arrives, and lasts
        ``chunk_slots`` slots (0.2 s at 5 MHz): longer than a scan's wait after a setting
        change, so the last batch may have been counted with the settings before it. With
        ``fresh_within_s`` and the world paced in real time, the reading waits (up to that
        long) for a batch counted with the settings and faults now in force, as a counter
        that restarts its integration when a setting changes; past that (nothing on the
        fiber) it is the last batch's. A world stepped by hand answers at once.
        """
        with self._counts_ready:
            if fresh_within_s > 0 and self._thread is not None:
                deadline = time.monotonic() + fresh_within_s
                while self._counts_key != self._reading_key():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._counts_ready.wait(remaining)
            if self.last_duration_s <= 0:
                return np.zeros(N_CHANNELS)
            counts = self.last_counts.astype(np.float64)
            seconds = self.last_duration_s
            if self._counter_integration_s > seconds:
                # the most recent batches counted with the same settings, up to the
                # counters' integration period
                key = self._counts_key
                counts, seconds = np.zeros(N_CHANNELS), 0.0
                for k, c, d in reversed(self._count_history):
                    if k != key or seconds >= self._counter_integration_s:
                        break
                    counts += c
                    seconds += d
            return counts / seconds

    # --- real-time pacing ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None or self._sock is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._pump, name="simlink-rx", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                self.receive(0.1)
            except Exception:
                log.exception("simlink receiver world: batch failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None


World = TransmitterWorld | ReceiverWorld

#: the worlds this process runs, by simulated link name ("" for a process on one link)
_worlds: dict[str, World] = {}
_world_lock = threading.Lock()


SideParams = TransmitterSimParams | ReceiverSimParams

#: Slots of the small chunk a warm-up runs (the compiled code does not depend on it).
_WARM_UP_SLOTS = 4096


def warm_up_transmitter(params: TransmitterSimParams) -> None:
    """Compile (or load from numba's disk cache) the transmitter's kernels: one small
    chunk through a throw-away transmitter world, and the slot choices of sifting."""
    small = params.model_copy(update={"chunk_slots": _WARM_UP_SLOTS, "start_calibrated": True})
    tx = TransmitterWorld(small, None)
    try:
        chunk = tx.step()
        tx.prepared(chunk.photons["slot"])  # the transmitter's side of sifting
    finally:
        tx.close()


def synthetic_batch(n_slots: int = _WARM_UP_SLOTS) -> tuple[dict[str, Any], npt.NDArray[np.void]]:
    """A fiber batch made up on the receiver's side (no transmitter involved): pulses in
    every eighth slot, in the four polarisations, one or two photons, as a read-only
    buffer like one off the fiber socket."""
    slots = np.arange(0, n_slots, 8, dtype=np.int64)
    photons = np.zeros(slots.size, PHOTON_DTYPE)
    photons["slot"] = slots
    photons["angle_rad"] = (np.arange(slots.size) % 4 * (math.pi / 4)).astype(np.float32)
    photons["n_photons"] = 1 + (np.arange(slots.size) % 16 == 0)
    header = {
        "v": FIBER_PROTOCOL_VERSION,
        "run": 0,
        "chunk": 0,
        "slot_start": 0,
        "slot_stop": n_slots,
        "slot_rate_hz": 25e6,
        "t0_ps": 0,
        "rotation": list(_IDENTITY9),
    }
    return header, np.frombuffer(photons.tobytes(), dtype=PHOTON_DTYPE)


def warm_up_receiver(params: ReceiverSimParams) -> None:
    """Compile (or load) the receiver's kernels: a synthetic batch through a throw-away
    receiver world. Never builds a transmitter world."""
    rx = ReceiverWorld(params.model_copy(update={"start_calibrated": True}), None)
    try:
        rx.process(*synthetic_batch())
    finally:
        rx.close()


def warm_up(params: SideParams) -> None:
    """Compile (or load from the on-disk cache) the numba kernels of this side.

    The first compile on a fresh machine takes tens of seconds and holds the GIL, so the
    daemon does it before it reports ready, not in the middle of a session.
    """
    if isinstance(params, TransmitterSimParams):
        warm_up_transmitter(params)
    elif isinstance(params, ReceiverSimParams):
        warm_up_receiver(params)
    else:
        raise TypeError(f"warm_up: expected one side's parameters, got {type(params).__name__}")


def start_world(
    role: Literal["transmitter", "receiver"] | str,
    params: SideParams,
    fiber_endpoint: str | None,
    realtime: bool = True,
    name: str = "",
) -> World:
    """Create this process's world for ``role`` from that side's parameters and start it
    in real time.

    ``fiber_endpoint`` None: no fiber (tests step the world by hand); ``realtime`` False:
    the world is registered but not paced by a background thread. ``name``: the simulated
    link's name, for a process that takes part in several (``""``: its only one).

    Raises RuntimeError if a world of that name already runs, ValueError on an unknown
    role, TypeError when ``params`` are not ``role``'s side, and zmq.ZMQError if the fiber
    endpoint cannot be bound (transmitter) or connected.
    """
    if role not in ("transmitter", "receiver"):
        raise ValueError(f"start_world: role must be transmitter or receiver, got {role!r}")
    want = TransmitterSimParams if role == "transmitter" else ReceiverSimParams
    if not isinstance(params, want):
        raise TypeError(
            f"start_world: the {role}'s world needs {want.__name__}, got {type(params).__name__}"
        )
    with _world_lock:
        running = _worlds.get(name)
        if running is not None:
            raise RuntimeError(
                f"a simulated {running.role} world{_named(name)} already runs in this process"
            )
        world: World
        warm_up(params)
        if isinstance(params, TransmitterSimParams):
            world = TransmitterWorld(params, fiber_endpoint)
        else:
            world = ReceiverWorld(params, fiber_endpoint)
        if realtime:
            world.start()
        _worlds[name] = world
        log.info("simlink %s world%s started on %s", role, _named(name), fiber_endpoint)
        return world


def _named(name: str) -> str:
    return f" {name!r}" if name else ""


def get_world(name: str = "") -> World:
    """The world of simulated link ``name``; ``""``: the process's only world.

    Raises RuntimeError naming what runs when there is no such world, or when ``name`` is
    ``""`` and the process runs several (the instrument must name its link).
    """
    with _world_lock:
        worlds = dict(_worlds)
    if name in worlds:
        return worlds[name]
    if not name and len(worlds) == 1:
        return next(iter(worlds.values()))
    if not worlds:
        raise RuntimeError("no simulated link world runs in this process (start_world)")
    names = ", ".join(repr(n) for n in sorted(worlds))
    if not name:
        raise RuntimeError(
            f"this process runs several simulated links ({names}): name one as the "
            f"instrument's resource"
        )
    raise RuntimeError(f"no simulated link {name!r} runs in this process (it runs {names})")


def stop_world(name: str | None = None) -> None:
    """Stop and forget the world of simulated link ``name`` (None: every world).
    Idempotent."""
    with _world_lock:
        if name is None:
            stopping = list(_worlds.values())
            _worlds.clear()
        else:
            world = _worlds.pop(name, None)
            stopping = [] if world is None else [world]
    for world in stopping:
        world.close()
        log.info("simlink %s world stopped", world.role)
