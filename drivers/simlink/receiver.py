"""Receiver side of the link model: detection physics and the time tagger's clock.

Pure, vectorised numpy code driven chunk by chunk by the receiver world. Inputs are the
photons that crossed the fiber (:data:`drivers.simlink.source.PHOTON_DTYPE`) and the
current detector settings; outputs are detection records on the tagger's clock.

Physics, per pulse that reached the receiver with ``n`` photons at angle ``theta``:

* basis choice: passive (each photon independently takes Z with ``p_basis_z``) or active
  (one random basis per pulse);
* in each basis arm (analyser at 0 or 45 degrees) the pulse leaves by the orthogonal port
  with probability ``p = sin^2(theta + drift - analyser)``, then the misalignment flips
  the port with probability ``e_d`` (pulse-wise, the model behind the GLLP formulas);
* the detector on that port clicks with ``1 - (1 - eff)^n_arm`` if the jittered arrival
  falls inside its gate (gate centred on the detector's delay setting, slot-locked);
* dark counts: Poisson in each gate with ``dark_rate_hz * gate_width``;
* afterpulses: each kept click releases one with ``afterpulse_probability`` at the first
  gate after ``dead_time + Exp(afterpulse_delay)``; cascades included;
* dead time: non-paralysable, per detector, carried across chunks.

Time: "true time" is the transmitter's slot clock shifted by the fiber delay. The
detector gates are locked to the pulse train (clock recovered from the light), the time
tagger is not: :class:`ReceiverClock` maps true time to tagger time with an offset, a
frequency offset and a random-walk frequency wander.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from drivers.simlink.params import ClockParams, ReceiverParams

__all__ = ["DetectionRecords", "DetectorSettings", "ReceiverClock", "ReceiverModel"]

N_CHANNELS = 4
_ANALYSER_RAD = (0.0, math.pi / 4)


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
            dark_rate_hz=np.full(N_CHANNELS, rx.dark_count_rate_hz),
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

    def map_chunk(
        self,
        chunk_t0_ps: int,
        rel_ps: npt.NDArray[np.float64],
        duration_ps: int,
        rng: np.random.Generator,
    ) -> npt.NDArray[np.int64]:
        """Tagger times of true times ``chunk_t0_ps + rel_ps`` (``0 <= rel_ps < duration``),
        then advance the clock to the chunk's end and step the wander."""
        self._advance_to(chunk_t0_ps)
        scaled = rel_ps * (1.0 + self.frequency_offset) + self._tagger_frac
        out = np.floor(scaled).astype(np.int64) + np.int64(self._tagger_ps)
        self._advance_to(chunk_t0_ps + duration_ps)
        if self._wander_per_sqrt_s > 0:
            self._wander += rng.normal(
                0.0, self._wander_per_sqrt_s * math.sqrt(duration_ps * 1e-12)
            )
        return out


def _by_channel_then_time(
    channel: npt.NDArray[np.int16], time_ps: npt.NDArray[np.int64]
) -> npt.NDArray[np.intp]:
    """Order by channel, then time. Input is nearly time-sorted, so two stable sorts (a
    run-merging sort on time, a radix sort on the int16 channel) beat ``lexsort``."""
    by_time = np.argsort(time_ps, kind="stable")
    return by_time[np.argsort(channel[by_time], kind="stable")]


def _dead_time_keep(
    channel: npt.NDArray[np.int16],
    time_ps: npt.NDArray[np.int64],
    dead_time_ps: npt.NDArray[np.float64],
    last_click_ps: npt.NDArray[np.int64],
) -> npt.NDArray[np.intp]:
    """Indices of clicks kept by a non-paralysable dead time (input sorted by channel, time).

    A click whose predecessor (the last surviving click of its detector) is certainly kept
    and lies within the dead time is certainly lost; removing those and repeating converges
    in as many rounds as the longest chain of overlapping clicks.
    """
    idx = np.arange(channel.shape[0])
    while idx.size:
        ch = channel[idx]
        t = time_ps[idx]
        first = np.ones(idx.size, np.bool_)
        first[1:] = ch[1:] != ch[:-1]
        prev = np.empty_like(t)
        prev[1:] = t[:-1]
        prev[first] = last_click_ps[ch[first]]
        viol = (t - prev) < dead_time_ps[ch]
        if not viol.any():
            break
        prev_viol = np.zeros_like(viol)
        prev_viol[1:] = viol[:-1]
        prev_viol[first] = False
        idx = idx[~(viol & ~prev_viol)]
    return idx


class ReceiverModel:
    """Detection physics of the receiver, applied chunk after chunk.

    ``process`` must be called with contiguous, increasing chunks; the model keeps the
    state that crosses chunk boundaries (dead time, pending afterpulses, clock, drift).
    """

    def __init__(
        self,
        rx: ReceiverParams,
        clock: ClockParams,
        misalignment: float,
        drift_rad_per_sqrt_s: float,
    ) -> None:
        self.rx = rx
        self.misalignment = misalignment
        self.drift_rad_per_sqrt_s = drift_rad_per_sqrt_s
        self.drift_rad = 0.0
        self.clock = ReceiverClock(clock)
        self._last_click_ps = np.full(N_CHANNELS, -(1 << 62), np.int64)
        self._pending_channel = np.empty(0, np.int16)
        self._pending_time = np.empty(0, np.int64)
        self._pending_slot = np.empty(0, np.int64)

    # --- helpers --------------------------------------------------------------------
    def _photon_clicks(
        self,
        photons: npt.NDArray[np.void],
        *,
        slot_start: int,
        period_ps: float,
        settings: DetectorSettings,
        extra_rotation_rad: float,
        rng: np.random.Generator,
    ) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        rx = self.rx
        n = photons["n_photons"]
        m = n.shape[0]
        if rx.basis_choice == "passive":
            n_z = np.asarray(rng.random(m, dtype=np.float32) < rx.p_basis_z, dtype=np.uint8)
            multi = np.flatnonzero(n > 1)
            if multi.size:
                n_z[multi] = rng.binomial(n[multi], rx.p_basis_z)
            else:
                n_z &= n  # n is 1 everywhere
        else:
            n_z = np.where(rng.random(m, dtype=np.float32) < rx.p_basis_z, n, 0).astype(np.uint8)
        n_x = n - n_z
        # One event per pulse in its first non-empty arm, plus the rare pulses whose photons
        # went to both arms (passive choice, multi-photon).
        arm = (n_z == 0).astype(np.int16)
        n_arm = np.where(arm == 0, n_z, n_x)
        ev = np.arange(m)
        both = np.flatnonzero((n_z > 0) & (n_x > 0))
        if both.size:
            ev = np.concatenate([ev, both])
            arm = np.concatenate([arm, np.ones(both.size, np.int16)])
            n_arm = np.concatenate([n_arm, n_x[both]])
        angle = photons["angle_rad"][ev]
        rotation = np.float32(self.drift_rad + extra_rotation_rad)
        analyser = np.asarray(_ANALYSER_RAD, dtype=np.float32)[arm]
        p_orth = np.sin(angle + rotation - analyser) ** 2
        e_d = np.float32(self.misalignment)
        p_port1 = e_d + p_orth * (np.float32(1.0) - 2 * e_d)
        channel = (2 * arm + (rng.random(ev.size, dtype=np.float32) < p_port1)).astype(np.int16)
        eff = np.where(settings.enabled, settings.efficiency, 0.0).astype(np.float32)
        p_click = eff[channel]
        multi_ev = np.flatnonzero(n_arm > 1)
        if multi_ev.size:
            p_click[multi_ev] = 1.0 - (1.0 - p_click[multi_ev]) ** n_arm[multi_ev]
        # Click and jitter are independent: draw the jitter only for would-be clicks.
        det = np.flatnonzero(rng.random(ev.size, dtype=np.float32) < p_click)
        channel = channel[det]
        offset_ps = rx.true_delay_ps + (
            rng.standard_normal(det.size, dtype=np.float32) * np.float32(rx.jitter_ps)
        )
        miss = offset_ps - settings.delay_ps[channel]
        miss = (miss + period_ps / 2) % period_ps - period_ps / 2
        hit = np.abs(miss) < rx.gate_width_ps / 2
        slot = photons["slot"][ev[det[hit]]]
        rel = np.maximum((slot - slot_start) * period_ps + offset_ps[hit], 0.0)
        return channel[hit], rel, slot

    def _dark_clicks(
        self,
        slot_start: int,
        n_slots: int,
        period_ps: float,
        settings: DetectorSettings,
        rng: np.random.Generator,
    ) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        gate_s = self.rx.gate_width_ps * 1e-12
        counts = rng.poisson(
            np.where(settings.enabled, settings.dark_rate_hz, 0.0) * gate_s * n_slots
        )
        channel = np.repeat(np.arange(N_CHANNELS, dtype=np.int16), counts)
        slot_rel = rng.integers(0, n_slots, size=channel.size)
        in_gate = (rng.random(channel.size) - 0.5) * self.rx.gate_width_ps
        # Gates repeat every period: a delay setting outside [0, period) wraps.
        rel = slot_rel * period_ps + (settings.delay_ps[channel] + in_gate) % period_ps
        return channel, rel, slot_rel + slot_start

    def _afterpulses(
        self,
        channel: npt.NDArray[np.int16],
        time_ps: npt.NDArray[np.int64],
        *,
        chunk_t0_ps: int,
        slot_start: int,
        period_ps: float,
        settings: DetectorSettings,
        rng: np.random.Generator,
    ) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        p_ap = self.rx.afterpulse_probability
        out_c: list[npt.NDArray[np.int16]] = []
        out_t: list[npt.NDArray[np.int64]] = []
        parents_c, parents_t = channel, time_ps
        while p_ap > 0 and parents_c.size:
            sel = rng.random(parents_c.size) < p_ap
            c = parents_c[sel]
            if c.size == 0:
                break
            release = (
                parents_t[sel]
                + settings.dead_time_ps[c]
                + rng.exponential(self.rx.afterpulse_delay_ns * 1e3, c.size)
            )
            gate_open = settings.delay_ps[c] - self.rx.gate_width_ps / 2
            k = np.ceil((release - chunk_t0_ps - gate_open) / period_ps)
            t = np.round(chunk_t0_ps + k * period_ps + settings.delay_ps[c]).astype(np.int64)
            out_c.append(c)
            out_t.append(t)
            parents_c, parents_t = c, t
        if not out_c:
            return np.empty(0, np.int16), np.empty(0, np.int64), np.empty(0, np.int64)
        c_all = np.concatenate(out_c)
        t_all = np.concatenate(out_t)
        slot = slot_start + np.floor((t_all - chunk_t0_ps - settings.delay_ps[c_all]) / period_ps)
        return c_all, t_all, slot.astype(np.int64)

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
    ) -> DetectionRecords:
        """Detections caused by ``photons`` (slots in ``[slot_start, slot_stop)``) and by
        the detectors themselves in that span. ``chunk_t0_ps`` is the true time of slot
        ``slot_start``'s edge at the receiver; ``period_ps`` the exact slot period."""
        n_slots = slot_stop - slot_start
        period_f = float(period_ps)
        duration_ps = round(n_slots * period_ps)
        dt_s = duration_ps * 1e-12
        if self.drift_rad_per_sqrt_s > 0:
            self.drift_rad += rng.normal(0.0, self.drift_rad_per_sqrt_s * math.sqrt(dt_s))
        c1, r1, s1 = self._photon_clicks(
            photons,
            slot_start=slot_start,
            period_ps=period_f,
            settings=settings,
            extra_rotation_rad=extra_rotation_rad,
            rng=rng,
        )
        c2, r2, s2 = self._dark_clicks(slot_start, n_slots, period_f, settings, rng)
        channel = np.concatenate([c1, c2, self._pending_channel])
        time_ps = np.concatenate(
            [
                np.round(r1).astype(np.int64) + chunk_t0_ps,
                np.round(r2).astype(np.int64) + chunk_t0_ps,
                self._pending_time,
            ]
        )
        slot = np.concatenate([s1, s2, self._pending_slot])
        # A detector that is off now also swallows pending afterpulses and stray clicks.
        ok = settings.enabled[channel]
        channel, time_ps, slot = channel[ok], time_ps[ok], slot[ok]

        keep = _by_channel_then_time(channel, time_ps)
        keep = keep[
            _dead_time_keep(
                channel[keep], time_ps[keep], settings.dead_time_ps, self._last_click_ps
            )
        ]
        channel, time_ps, slot = channel[keep], time_ps[keep], slot[keep]
        ca, ta, sa = self._afterpulses(
            channel,
            time_ps,
            chunk_t0_ps=chunk_t0_ps,
            slot_start=slot_start,
            period_ps=period_f,
            settings=settings,
            rng=rng,
        )
        if ca.size:
            channel = np.concatenate([channel, ca])
            time_ps = np.concatenate([time_ps, ta])
            slot = np.concatenate([slot, sa])
            keep = _by_channel_then_time(channel, time_ps)
            keep = keep[
                _dead_time_keep(
                    channel[keep], time_ps[keep], settings.dead_time_ps, self._last_click_ps
                )
            ]
            channel, time_ps, slot = channel[keep], time_ps[keep], slot[keep]

        # Clicks past the chunk's end (late afterpulses, jitter) belong to the next chunk.
        chunk_end = chunk_t0_ps + duration_ps
        later = time_ps >= chunk_end
        if later.any():
            self._pending_channel = channel[later]
            self._pending_time = time_ps[later]
            self._pending_slot = slot[later]
            now = ~later
            channel, time_ps, slot = channel[now], time_ps[now], slot[now]
        else:
            self._pending_channel = np.empty(0, np.int16)
            self._pending_time = np.empty(0, np.int64)
            self._pending_slot = np.empty(0, np.int64)
        if channel.size:
            # Last kept click per detector (input is sorted by channel then time).
            last_of_group = np.ones(channel.size, np.bool_)
            last_of_group[:-1] = channel[1:] != channel[:-1]
            self._last_click_ps[channel[last_of_group]] = time_ps[last_of_group]

        order = np.argsort(time_ps, kind="stable")
        channel, time_ps, slot = channel[order], time_ps[order], slot[order]
        rel = (time_ps - chunk_t0_ps).astype(np.float64)
        tagger_ps = self.clock.map_chunk(chunk_t0_ps, rel, duration_ps, rng)
        tagger_ps += settings.tagger_delay_ps[channel]
        if np.any(settings.tagger_delay_ps):
            order = np.argsort(tagger_ps, kind="stable")
            channel, tagger_ps, time_ps, slot = (
                channel[order],
                tagger_ps[order],
                time_ps[order],
                slot[order],
            )
        return DetectionRecords(channel, tagger_ps, time_ps, slot)
