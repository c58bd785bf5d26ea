"""Receiver side of the link model: detection physics and the time tagger's clock.

Driven chunk by chunk by the receiver world; the per-event loops are compiled
(:mod:`drivers.simlink.kernels`), this module prepares their inputs. Inputs are the
photons that crossed the fiber (:data:`drivers.simlink.source.PHOTON_DTYPE`) and the
current detector settings; outputs are detection records on the tagger's clock.

Physics, per pulse that reached the receiver with ``n`` photons at angle ``theta``:

* basis choice: passive (each photon independently takes Z with ``p_basis_z``) or active
  (one random basis per pulse);
* in each basis arm (analyser at 0 or 45 degrees) the pulse leaves by the orthogonal port
  with probability ``p = sin^2(theta + rotation - analyser)`` (``theta`` as it left the
  fiber, which applied its misalignment and drift; ``rotation`` a receiver-side fault);
  with a full SU(2) rotation ``R`` between the fiber's end and the analysers (the fiber's
  drift and the polarisation controller, :mod:`drivers.simlink.polarization`), ``p =
  (1 - (R s)_a) / 2`` for the pulse's Stokes vector ``s`` and the arm's axis ``a``;
* the detector on that port clicks with ``1 - (1 - eff)^n_arm`` if the jittered arrival
  falls inside its gate (gate centred on the detector's delay setting, slot-locked);
* dark counts: Poisson in each gate with ``dark_rate_hz * gate_width`` (times the
  temperature drift's factor, :class:`~drivers.simlink.params.ReceiverDriftParams`);
* afterpulses: each kept click releases one with ``afterpulse_probability`` at the first
  gate after ``dead_time + Exp(afterpulse_delay)``; cascades included;
* dead time: non-paralysable, per detector, carried across chunks (events are
  processed in time order; those past the chunk's end wait for the next chunk).

Time: "true time" is the transmitter's slot clock shifted by the fiber delay (each fiber
batch gives the arrival time of its first slot). The
detector gates are locked to the pulse train (clock recovered from the light), the time
tagger is not: :class:`ReceiverClock` maps true time to tagger time with an offset, a
frequency offset and a random-walk frequency wander.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from drivers.simlink.kernels import receiver_events
from drivers.simlink.params import ClockParams, ReceiverParams
from drivers.simlink.source import PHOTON_BITS_DTYPE, PHOTON_DTYPE

__all__ = [
    "DetectionRecords",
    "DetectorSettings",
    "ReceiverClock",
    "ReceiverModel",
    "copy_photons",
    "span_ps",
]

N_CHANNELS = 4
_ANALYSER_RAD = (0.0, math.pi / 4)


@functools.lru_cache(maxsize=64)
def span_ps(n_slots: int, period_ps: Fraction) -> int:
    """Duration of ``n_slots`` slots in whole picoseconds (cached: chunk after chunk the
    same, and exact arithmetic on fractions is slow)."""
    return round(n_slots * period_ps)


@dataclass
class DetectorSettings:
    """Per-channel settings of the four detectors (H, V, D, A) and the tagger inputs."""

    efficiency: npt.NDArray[np.float64]
    dark_rate_hz: npt.NDArray[np.float64]
    enabled: npt.NDArray[np.bool_]
    delay_ps: npt.NDArray[np.float64]
    dead_time_ps: npt.NDArray[np.float64]
    tagger_delay_ps: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(N_CHANNELS, np.int64)
    )

    @classmethod
    def nominal(cls, rx: ReceiverParams) -> DetectorSettings:
        """All detectors armed at the true delay with their nominal efficiency."""
        return cls(
            efficiency=np.asarray(rx.detector_efficiency, dtype=np.float64),
            dark_rate_hz=np.asarray(rx.dark_count_rates_hz, dtype=np.float64),
            enabled=np.ones(N_CHANNELS, np.bool_),
            delay_ps=np.full(N_CHANNELS, rx.true_delay_ps),
            dead_time_ps=np.full(N_CHANNELS, rx.dead_time_ns * 1e3),
        )


@dataclass
class DetectionRecords:
    """Detections of one chunk in tagger-time order.

    ``time_ps`` is on the tagger's clock; ``true_time_ps`` and ``slot`` are simulation
    truth (slot of the gate the click fell in) for tests and diagnostics only: they never
    leave the receiver world.
    """

    channel: npt.NDArray[np.int16]
    time_ps: npt.NDArray[np.int64]
    true_time_ps: npt.NDArray[np.int64]
    slot: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.channel.shape[0])


class ReceiverClock:
    """Tagger time as a function of true time: offset, frequency offset, wander.

    Frequency ``y = ppm * 1e-6 + w`` where ``w`` does a random walk updated once per chunk
    (``wander_ppm_per_sqrt_s * 1e-6 * sqrt(chunk duration)``); tagger time is the integral
    of ``1 + y``. Integer picoseconds plus a float fraction keep full precision for days.
    """

    def __init__(self, clock: ClockParams) -> None:
        self._y0 = clock.frequency_offset_ppm * 1e-6
        self._wander_per_sqrt_s = clock.wander_ppm_per_sqrt_s * 1e-6
        self._wander = 0.0
        self._true_ps = 0
        self._tagger_ps = round(clock.offset_s * 1e12)
        self._tagger_frac = 0.0

    @property
    def frequency_offset(self) -> float:
        """Current fractional frequency offset (dimensionless)."""
        return self._y0 + self._wander

    def _advance_to(self, true_ps: int) -> None:
        gap = true_ps - self._true_ps
        if gap < 0:
            raise ValueError(f"receiver clock cannot go back ({gap} ps)")
        adv = gap * (1.0 + self.frequency_offset) + self._tagger_frac
        whole = math.floor(adv)
        self._tagger_ps += whole
        self._tagger_frac = adv - whole
        self._true_ps = true_ps

    def step(self, step_ps: int) -> None:
        """A clock step: tagger time jumps by ``step_ps`` (either sign) from now on."""
        self._tagger_ps += int(step_ps)

    def chunk_mapping(self, chunk_t0_ps: int) -> tuple[float, float, int]:
        """(scale, fraction, base) of the chunk starting at ``chunk_t0_ps``: the tagger
        time of true time ``chunk_t0_ps + rel`` is ``base + floor(rel * scale +
        fraction)``. Call :meth:`end_chunk` after mapping the chunk's times."""
        self._advance_to(chunk_t0_ps)
        return 1.0 + self.frequency_offset, self._tagger_frac, self._tagger_ps

    def end_chunk(self, chunk_t0_ps: int, duration_ps: int, rng: np.random.Generator) -> None:
        """Advance the clock to the chunk's end and step the wander."""
        self._advance_to(chunk_t0_ps + duration_ps)
        if self._wander_per_sqrt_s > 0:
            self._wander += rng.normal(
                0.0, self._wander_per_sqrt_s * math.sqrt(duration_ps * 1e-12)
            )

    def map_chunk(
        self,
        chunk_t0_ps: int,
        rel_ps: npt.NDArray[np.float64],
        duration_ps: int,
        rng: np.random.Generator,
    ) -> npt.NDArray[np.int64]:
        """Tagger times of true times ``chunk_t0_ps + rel_ps`` (``0 <= rel_ps < duration``),
        then advance the clock to the chunk's end and step the wander."""
        scale, frac, base = self.chunk_mapping(chunk_t0_ps)
        out = np.floor(rel_ps * scale + frac).astype(np.int64) + np.int64(base)
        self.end_chunk(chunk_t0_ps, duration_ps, rng)
        return out


class ReceiverModel:
    """Detection physics of the receiver, applied chunk after chunk.

    ``process`` must be called with contiguous, increasing chunks; the model keeps the
    state that crosses chunk boundaries (dead time, pending afterpulses, clock).
    """

    def __init__(self, rx: ReceiverParams, clock: ClockParams) -> None:
        self.rx = rx
        self.clock = ReceiverClock(clock)
        self._last_click_ps = np.full(N_CHANNELS, -(1 << 62), np.int64)
        self._pending_channel = np.empty(0, np.int16)
        self._pending_time = np.empty(0, np.int64)
        self._pending_slot = np.empty(0, np.int64)
        self._no_clicks = (np.empty(0, np.int16), np.empty(0, np.int64), np.empty(0, np.int64))
        self.last_counts = np.zeros(N_CHANNELS, np.int64)
        self._clicks = (
            np.empty(1024, np.int16),
            np.empty(1024, np.int64),
            np.empty(1024, np.int64),
        )
        self._photon_space = np.empty(0, PHOTON_DTYPE)
        self._kernel_cache: (
            tuple[
                DetectorSettings,
                tuple[
                    npt.NDArray[np.bool_],
                    npt.NDArray[np.float64],
                    npt.NDArray[np.float64],
                    npt.NDArray[np.float64],
                ],
            ]
            | None
        ) = None

    # --- helpers --------------------------------------------------------------------
    def _dark_clicks(
        self,
        slot_start: int,
        n_slots: int,
        chunk_t0_ps: int,
        *,
        period_ps: float,
        settings: DetectorSettings,
        rng: np.random.Generator,
        dark_factor: float = 1.0,
    ) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Dark clicks of the chunk (channel, true time, slot), sorted by time; the dark
        rates times ``dark_factor`` (the detectors' temperature drift).

        Poisson splitting: one draw for the total count (almost always 0 at realistic
        dark rates), then the channels of the clicks if there are any."""
        gate_s = self.rx.gate_width_ps * 1e-12
        rates = zip(settings.dark_rate_hz.tolist(), settings.enabled.tolist(), strict=True)
        rate_hz = [r * dark_factor if on else 0.0 for r, on in rates]
        total_mean = sum(rate_hz) * gate_s * n_slots
        n_dark = int(rng.poisson(total_mean)) if total_mean > 0.0 else 0
        if n_dark == 0:
            return self._no_clicks
        counts = rng.multinomial(n_dark, np.asarray(rate_hz) / sum(rate_hz))
        channel = np.repeat(np.arange(N_CHANNELS, dtype=np.int16), counts)
        slot_rel = rng.integers(0, n_slots, size=channel.size)
        in_gate = (rng.random(channel.size) - 0.5) * self.rx.gate_width_ps
        # Gates repeat every period: a delay setting outside [0, period) wraps.
        rel = slot_rel * period_ps + (settings.delay_ps[channel] + in_gate) % period_ps
        time_ps = np.round(rel).astype(np.int64) + chunk_t0_ps
        order = np.argsort(time_ps, kind="stable")
        return channel[order], time_ps[order], slot_rel[order] + slot_start

    def _private_copy(self, photons: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
        """A writable copy of a (read-only) fiber batch in space reused from chunk to
        chunk (see :func:`copy_photons`)."""
        n = photons.shape[0]
        if self._photon_space.shape[0] < n:
            self._photon_space = np.empty(max(n, 2 * self._photon_space.shape[0]), PHOTON_DTYPE)
        out = self._photon_space[:n]
        if photons.dtype == PHOTON_DTYPE:
            out.view(np.uint8)[:] = np.ascontiguousarray(photons).view(np.uint8)
        else:  # same fields, another layout
            for name in PHOTON_DTYPE.names or ():
                out[name] = photons[name]
        return out

    def _click_space(
        self, n_pulses: int
    ) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The kernel's scratch space for the photon clicks (room for two per pulse),
        reused from chunk to chunk: its pages are touched once, not once per chunk."""
        if self._clicks[0].shape[0] < 2 * n_pulses:
            cap = max(2 * n_pulses, 2 * self._clicks[0].shape[0])
            self._clicks = (
                np.empty(cap, np.int16),
                np.empty(cap, np.int64),
                np.empty(cap, np.int64),
            )
        return self._clicks

    def _kernel_settings(
        self, settings: DetectorSettings
    ) -> tuple[
        npt.NDArray[np.bool_],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
    ]:
        """(enabled, efficiency, delay, dead time) as the kernel takes them, derived
        again only when ``settings`` is another object."""
        if self._kernel_cache is None or self._kernel_cache[0] is not settings:
            arrays = (
                np.ascontiguousarray(settings.enabled, dtype=np.bool_),
                np.where(settings.enabled, settings.efficiency, 0.0).astype(np.float64),
                np.ascontiguousarray(settings.delay_ps, dtype=np.float64),
                np.ascontiguousarray(settings.dead_time_ps, dtype=np.float64),
            )
            self._kernel_cache = (settings, arrays)
        return self._kernel_cache[1]

    # --- main entry ------------------------------------------------------------------
    def process(
        self,
        photons: npt.NDArray[np.void],
        slot_start: int,
        slot_stop: int,
        *,
        chunk_t0_ps: int,
        period_ps: Fraction,
        settings: DetectorSettings,
        rng: np.random.Generator,
        extra_rotation_rad: float = 0.0,
        rotation: npt.NDArray[np.float64] | None = None,
        dark_factor: float = 1.0,
    ) -> DetectionRecords:
        """Detections caused by ``photons`` (slots in ``[slot_start, slot_stop)``) and by
        the detectors themselves in that span. ``chunk_t0_ps`` is the true time of slot
        ``slot_start``'s edge at the receiver; ``period_ps`` the exact slot period.

        ``rotation`` (3x3, Poincaré sphere; None: identity) turns the photons' states
        between the batch's angles and the analysers (the fiber's SU(2) rotation and the
        polarisation controller); ``extra_rotation_rad`` then turns them by that angle in
        real space (a receiver-side step of the reference, about ``S3``). The dark rates
        are the settings' times ``dark_factor``."""
        rx = self.rx
        n_slots = slot_stop - slot_start
        period_f = float(period_ps)
        duration_ps = span_ps(n_slots, period_ps)
        seed = np.uint64(rng.bit_generator.random_raw())
        dark_c, dark_t, dark_s = self._dark_clicks(
            slot_start,
            n_slots,
            chunk_t0_ps,
            period_ps=period_f,
            settings=settings,
            rng=rng,
            dark_factor=dark_factor,
        )
        # Always C-contiguous *and writable*: numba compiles one specialization per array
        # flavour, and a read-only batch (off the fiber socket) would otherwise compile a
        # second one in the middle of a session.
        if not (
            photons.flags.c_contiguous and photons.flags.writeable and photons.dtype == PHOTON_DTYPE
        ):
            photons = self._private_copy(photons)
        tagger_scale, tagger_frac, tagger_base = self.clock.chunk_mapping(chunk_t0_ps)
        counts = np.zeros(N_CHANNELS, np.int64)
        click_c, click_t, click_s = self._click_space(photons.shape[0])
        enabled, efficiency, delay_ps, dead_time_ps = self._kernel_settings(settings)
        channel, time_ps, slot, tagger_ps, pend_c, pend_t, pend_s = receiver_events(
            photons,
            photons.view(PHOTON_BITS_DTYPE),
            dark_c,
            dark_t,
            dark_s,
            self._pending_channel,
            self._pending_time,
            self._pending_slot,
            self._last_click_ps,
            counts,
            click_c,
            click_t,
            click_s,
            seed,
            slot_start,
            chunk_t0_ps,
            chunk_t0_ps + duration_ps,
            period_f,
            _analysis(rotation, extra_rotation_rad),
            0.0,  # the fiber's misalignment arrives in the photons' polarisation
            rx.p_basis_z,
            rx.basis_choice == "passive",
            enabled,
            efficiency,
            delay_ps,
            dead_time_ps,
            rx.true_delay_ps,
            rx.jitter_ps,
            rx.gate_width_ps,
            rx.afterpulse_probability,
            rx.afterpulse_delay_ns * 1e3,
            tagger_scale,
            tagger_frac,
            tagger_base,
        )
        self.clock.end_chunk(chunk_t0_ps, duration_ps, rng)
        self._pending_channel, self._pending_time, self._pending_slot = pend_c, pend_t, pend_s
        self.last_counts = counts
        if settings.tagger_delay_ps.any():
            tagger_ps += settings.tagger_delay_ps[channel]
            order = np.argsort(tagger_ps, kind="stable")
            channel, tagger_ps, time_ps, slot = (
                channel[order],
                tagger_ps[order],
                time_ps[order],
                slot[order],
            )
        return DetectionRecords(channel, tagger_ps, time_ps, slot)


def _analysis(
    rotation: npt.NDArray[np.float64] | None, extra_rotation_rad: float
) -> npt.NDArray[np.float64]:
    """The kernel's 2x2 analysis block of ``Rz(2 extra) @ rotation``."""
    c, s = math.cos(2.0 * extra_rotation_rad), math.sin(2.0 * extra_rotation_rad)
    turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    total = turn if rotation is None else turn @ np.asarray(rotation, dtype=np.float64)
    return np.ascontiguousarray(
        [total[0, 0], total[0, 1], total[1, 0], total[1, 1]], dtype=np.float64
    )


def copy_photons(photons: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
    """A C-contiguous, writable copy of the ``PHOTON_DTYPE`` records ``photons``, copied
    as bytes (numpy copies a packed record array field by field, about fifty times
    slower)."""
    out = np.empty(photons.shape[0], PHOTON_DTYPE)
    out.view(np.uint8)[:] = np.ascontiguousarray(photons).view(np.uint8)
    return out
