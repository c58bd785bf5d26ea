"""Doppler pre-compensation of a satellite downlink's time tags on the ground station.

Over a pass the time of flight changes by milliseconds at a rate of tens of ppm, and that
rate itself changes by up to a few tenths of a ppm per second. The receiver's clock model
(:mod:`qkdnode.procedures.sync`) is linear (offset and rate); over the seconds an
acquisition spans, the curvature of the time of flight moves the detections by tens to
hundreds of nanoseconds from any line, more than a slot. Ground stations therefore remove
the time of flight predicted from the orbit before they synchronise, as here:

``t' = t - (tau(u(t)) - tau_0)``

``tau`` is the predicted time of flight (:class:`TofPrediction`: the orbit geometry of
:mod:`drivers.satellite_pass` on the node's own predictions, ``passes.orbit``, the
windows' rise times and ``passes.time_scale``), ``tau_0`` a constant, and ``u(t)`` the
emission time of the pulse a tag detected: it solves ``u = u_0 + (t - t_0) - tau(u)``
for an anchor ``(u_0, t_0)``, a wall-clock time and a tagger time of about the same
moment. The anchor is taken from the first ``ANCHOR_BLOCKS`` blocks read: the one read
soonest after its last tag (``u_0`` the wall clock at that read, ``t_0`` the block's
end), so that it errs by the read latency ``d`` (milliseconds), then frozen. An anchor
error bends the corrected times by about ``d T^2 / 8`` times the third derivative of
``tau`` over an acquisition of ``T`` seconds: a few hundred picoseconds for 20 ms on a pass
compressed 4 times, far less on a real one. What the prediction leaves (its error, the
anchor's, the tagger's own clock offset) is nearly linear over seconds, and the
synchronization and its tracking loop take it as they take a fibre link's clock offset.

:class:`DopplerCorrectedTagger` wraps the receiver's :class:`~drivers.interfaces.
TimeTagger`: ``read_block`` returns corrected tags (still in order: the correction is
smooth), everything else goes to the instrument. Failure modes: none of its own; the
instrument's errors pass through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.interfaces import TagBlock
from drivers.satellite_pass import (
    SPEED_OF_LIGHT_M_S,
    SatellitePassParams,
    pass_geometry,
    time_above_elevation_s,
)

__all__ = ["DopplerCorrectedTagger", "TofPrediction"]

#: Blocks over which the anchor is chosen (then frozen: a later change would step the
#: corrected times).
ANCHOR_BLOCKS = 50

#: Sampling of the predicted time of flight (s of wall clock); linear interpolation
#: between samples errs by ``tau'' dt^2 / 8``, below a picosecond here.
_TABLE_DT_S = 0.005


class TofPrediction:
    """The predicted time of flight over each pass window, from the orbit geometry of
    :mod:`drivers.satellite_pass` (constant at a window's edge value between passes).

    A pass compressed ``time_scale`` times (simulated demonstrations) has the compressed
    time of flight the simulated link gives it: ``L_min / c + (L(k t) - L_min) / (k c)``.
    """

    def __init__(
        self,
        orbit: SatellitePassParams,
        rises_unix_s: Sequence[float],
        time_scale: float = 1.0,
    ) -> None:
        k = float(time_scale)
        half_s = time_above_elevation_s(orbit, orbit.min_elevation_deg) / 2.0
        _, closest, _ = pass_geometry(orbit, np.zeros(1))
        r_min = float(closest[0])
        times: list[npt.NDArray[np.float64]] = []
        tofs: list[npt.NDArray[np.float64]] = []
        for rise in rises_unix_s:
            duration = 2.0 * half_s / k
            n = max(2, int(duration / _TABLE_DT_S) + 1)
            t = np.linspace(rise, rise + duration, n)
            _, range_m, _ = pass_geometry(orbit, -half_s + (t - rise) * k)
            times.append(t)
            tofs.append((r_min + (range_m - r_min) / k) / SPEED_OF_LIGHT_M_S)
        self._t = np.concatenate(times) if times else np.zeros(1)
        self._tof = np.concatenate(tofs) if tofs else np.zeros(1)

    def tof_s(self, unix_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Predicted time of flight (s) at Unix times ``unix_s``."""
        out: npt.NDArray[np.float64] = np.interp(unix_s, self._t, self._tof)
        return out


class DopplerCorrectedTagger:
    """A time tagger whose tags have the predicted time of flight's changes removed."""

    def __init__(self, tagger: Any, prediction: TofPrediction) -> None:
        self._tagger = tagger
        self._prediction = prediction
        self._lock = threading.Lock()
        self._anchor: tuple[float, int, float] | None = None  # (u_0, t_0 ps, tau(u_0))
        self._anchored = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tagger, name)

    def correction_ps(self, time_ps: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """``tau(u(t)) - tau(u_0)`` in ps for tagger times ``time_ps`` (anchored)."""
        assert self._anchor is not None
        u0, t0, tau0 = self._anchor
        # The anchor's tag arrived (at the latest) at u0: a tag's arrival on the wall
        # clock is u0 + (t - t0), and its pulse's emission u solves u = arrival - tau(u);
        # two fixed-point steps reach far below a picosecond (each shrinks the error by
        # tau', tens of ppm).
        arrival = u0 + (time_ps.astype(np.float64) - t0) * 1e-12
        unix = arrival - tau0
        for _ in range(2):
            unix = arrival - self._prediction.tof_s(unix)
        return np.rint((self._prediction.tof_s(unix) - tau0) * 1e12).astype(np.int64)

    def read_block(self, timeout_s: float) -> TagBlock | None:
        block: TagBlock | None = self._tagger.read_block(timeout_s)
        if block is None:
            return None
        with self._lock:
            if self._anchored < ANCHOR_BLOCKS:
                # The block's last tag arrived at most now: of the first blocks, the one
                # read soonest after its end places tagger time on the wall clock best.
                now = time.time()
                latest = int(block.stop_ps)
                if self._anchor is None or now - latest * 1e-12 < (
                    self._anchor[0] - self._anchor[1] * 1e-12
                ):
                    tau0 = float(self._prediction.tof_s(np.array([now]))[0])  # a reference
                    self._anchor = (now, latest, tau0)
                self._anchored += 1
        tags = block.tags.copy()
        if tags.shape[0]:
            t = tags["time_ps"].astype(np.int64)
            tags["time_ps"] = t - self.correction_ps(t)
        edges = self.correction_ps(np.array([block.start_ps, block.stop_ps], dtype=np.int64))
        return replace(
            block,
            tags=tags,
            start_ps=int(block.start_ps - edges[0]),
            stop_ps=int(block.stop_ps - edges[1]),
        )
