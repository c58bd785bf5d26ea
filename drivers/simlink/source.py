"""Transmitter side of the link model: per-slot secret choices and surviving photons.

The transmitter world (:mod:`drivers.simlink.world`) calls them chunk by chunk; the
per-candidate loop is compiled (:func:`drivers.simlink.kernels.transmitter_photons`).

Per-slot choices (basis, bit, intensity class) are a counter-based function of the
secret key and the slot index (``splitmix64(slot ^ key)``), so any slot can be answered
later without per-slot storage. Photons are generated only for *candidate* slots: the
gaps between candidates are geometric with the largest per-slot survival probability
``p_max``, and each candidate is kept with ``p_class / p_max`` where its class comes from
the hash. This is exact for independent Bernoulli slots and costs O(surviving photons),
never O(slots).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from drivers.simlink.kernels import _BLOCK, _gap_table, slot_choices_into, transmitter_photons
from drivers.syncpattern import slot_bright, splitmix64

__all__ = [
    "IDEAL_STATE_ANGLE_RAD",
    "PHOTON_BITS_DTYPE",
    "PHOTON_DTYPE",
    "EmissionSettings",
    "PhotonChunk",
    "generate_photons",
    "intercept_resend",
    "secret_key",
    "slot_choices",
]

#: One pulse that survived the fiber: its slot, polarisation angle (radians, linear
#: polarisation in real space) and the number of photons that reached the receiver (>= 1).
PHOTON_DTYPE = np.dtype([("slot", np.int64), ("angle_rad", np.float32), ("n_photons", np.uint8)])

#: The same records with the angle's float32 bit pattern (a view, for the receiver kernel).
PHOTON_BITS_DTYPE = np.dtype(
    [("slot", np.int64), ("angle_bits", np.uint32), ("n_photons", np.uint8)]
)

#: Polarisation angle of H, V, D, A (index = basis * 2 + bit) when the encoder is ideal.
IDEAL_STATE_ANGLE_RAD = (0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4)

_TWO32 = float(1 << 32)
_TWO31 = float(1 << 31)
_TWO52 = float(1 << 52)


def secret_key(transmitter_seed: int) -> np.uint64:
    """The 64-bit key of the counter-based choice generator for ``transmitter_seed``."""
    mixed = splitmix64(np.array([transmitter_seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64))
    return np.uint64(mixed[0])


def slot_choices(
    key: np.uint64,
    slots: npt.NDArray[np.int64],
    *,
    p_signal: float,
    p_decoy: float,
    p_basis_z: float,
    sync_seed: int | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Basis (0 Z, 1 X), bit and intensity class of each slot in ``slots``.

    The hash's high 32 bits choose the class, bits 1..31 the basis and bit 0 the bit.
    With ``sync_seed`` the class follows the public pattern (bright = SIGNAL, dark =
    VACUUM) while basis and bit stay random.
    """
    # Integer thresholds on the hash bits: the same as comparing uniforms.
    z_threshold = np.uint64(int(p_basis_z * _TWO31))
    if sync_seed is None:
        s = np.ascontiguousarray(slots, dtype=np.int64)
        basis = np.empty(s.shape[0], np.uint8)
        bit = np.empty(s.shape[0], np.uint8)
        intensity = np.empty(s.shape[0], np.uint8)
        thresholds = np.array(
            [int(p_signal * _TWO32), int((p_signal + p_decoy) * _TWO32)], dtype=np.uint64
        )
        slot_choices_into(np.uint64(key), s, z_threshold, thresholds, basis, bit, intensity)
        return basis, bit, intensity
    h = splitmix64(np.asarray(slots, dtype=np.int64).astype(np.uint64) ^ key)
    bit = (h & np.uint64(1)).astype(np.uint8)
    basis = (((h >> np.uint64(1)) & np.uint64(0x7FFF_FFFF)) >= z_threshold).astype(np.uint8)
    intensity = np.where(slot_bright(sync_seed, slots), 0, 2).astype(np.uint8)
    return basis, bit, intensity


@dataclass(frozen=True)
class EmissionSettings:
    """What the transmitter emits in a chunk (fixed for the whole chunk).

    ``mu_per_class``: mean photon numbers (SIGNAL, DECOY, VACUUM) at the source output;
    ``transmittance``: fiber and insertion loss (0 when the fiber is cut);
    ``state_angle_rad``: prepared polarisation angle of H, V, D, A (encoder errors and
    reference steps included).
    """

    mu_per_class: tuple[float, float, float]
    p_signal: float
    p_decoy: float
    p_basis_z: float
    transmittance: float
    state_angle_rad: tuple[float, float, float, float] = IDEAL_STATE_ANGLE_RAD
    sync_seed: int | None = None
    eve_mode: str = "none"
    eve_fraction: float = 0.0


@dataclass
class PhotonChunk:
    """Photons of slots ``[slot_start, slot_stop)`` that reached the receiver."""

    slot_start: int
    slot_stop: int
    photons: npt.NDArray[np.void]
    #: slots whose bit the beam-splitting eavesdropper learnt (transmitter-side truth)
    eve_known_slots: npt.NDArray[np.int64]


def _zero_truncated_poisson_cdf(lam: float) -> npt.NDArray[np.float64]:
    """CDF over n = 1, 2, ... of Poisson(lam) conditioned on n >= 1 (last entry 1.0)."""
    if lam <= 0.0:
        return np.ones(1)
    n_max = int(lam + 12.0 * math.sqrt(lam) + 12)
    n = np.arange(1, n_max + 1, dtype=np.float64)
    log_pmf = n * math.log(lam) - lam - np.array([math.lgamma(k + 1.0) for k in n])
    cdf = np.cumsum(np.exp(log_pmf) / -math.expm1(-lam))
    cdf[-1] = 1.0
    return cdf


def intercept_resend(
    angle_rad: npt.NDArray[np.float32], fraction: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """Intercept-resend: a fraction of pulses is measured in a random basis and resent.

    Eve's analyser is at 0 (Z) or 45 degrees (X); she resends the state she found, so a
    pulse attacked in the wrong basis gives 50 % error: 25 % on all attacked pulses.
    """
    out = angle_rad.copy()
    attacked = np.flatnonzero(rng.random(angle_rad.shape[0]) < fraction)
    if attacked.size:
        analyser = rng.integers(0, 2, size=attacked.size) * (math.pi / 4)
        p_orth = np.sin(angle_rad[attacked] - analyser) ** 2
        found = rng.random(attacked.size) < p_orth
        out[attacked] = (analyser + found * (math.pi / 2)).astype(np.float32)
    return out


@dataclass(frozen=True)
class _EmissionTables:
    """Per-settings constants of :func:`drivers.simlink.kernels.transmitter_photons`."""

    p_max: float
    gap_scale: float
    gap_table: npt.NDArray[np.int64]
    class_threshold: npt.NDArray[np.uint64]
    z_threshold: np.uint64
    sync_mix: np.uint64
    keep_threshold: npt.NDArray[np.uint64]
    multi_threshold: npt.NDArray[np.uint64]
    inverse_ratio: npt.NDArray[np.float64]
    photon_cdf: npt.NDArray[np.float64]
    state_angle_rad: npt.NDArray[np.float32]


def _threshold_52(p: float) -> int:
    """The integer ``t`` with ``u < p  <=>  u * 2**52 < t`` for a 52-bit uniform ``u``."""
    return min(math.ceil(p * _TWO52), 1 << 52)


@functools.lru_cache(maxsize=32)
def _emission_tables(settings: EmissionSettings) -> _EmissionTables:
    """The kernel's constants for ``settings`` (they change only when an instrument does,
    so chunk after chunk reuses them)."""
    lam = [settings.transmittance * m for m in settings.mu_per_class]
    p_survive = [-math.expm1(-x) for x in lam]
    classes_used = [0, 2] if settings.sync_seed is not None else [0, 1, 2]
    p_max = max(p_survive[c] for c in classes_used)
    cdfs = [_zero_truncated_poisson_cdf(x) for x in lam]
    photon_cdf = np.ones((3, max(3, *(c.size for c in cdfs))))
    for c, cdf in enumerate(cdfs):
        photon_cdf[c, : cdf.size] = cdf
    accept = [p / p_max if p_max > 0.0 else 0.0 for p in p_survive]
    # u / accept >= cdf[j]  <=>  u >= accept * cdf[j]; at least 1 so a dropped candidate
    # (u set to 0) always counts one photon
    multi = [
        [max(_threshold_52(a * photon_cdf[c, j]), 1) for j in (0, 1)] for c, a in enumerate(accept)
    ]
    gap_scale = 0.0 if p_max >= 1.0 or p_max <= 0.0 else -1.0 / math.log1p(-p_max)
    return _EmissionTables(
        p_max=p_max,
        gap_scale=gap_scale,
        gap_table=_gap_table(gap_scale),
        class_threshold=np.array(
            [int(settings.p_signal * _TWO32), int((settings.p_signal + settings.p_decoy) * _TWO32)],
            dtype=np.uint64,
        ),
        z_threshold=np.uint64(int(settings.p_basis_z * _TWO31)),
        # the pattern's frame bits hash with the seed mixed as drivers.syncpattern does
        sync_mix=secret_key(settings.sync_seed) if settings.sync_seed is not None else np.uint64(0),
        keep_threshold=np.array([_threshold_52(a) for a in accept], dtype=np.uint64),
        multi_threshold=np.array(multi, dtype=np.uint64),
        inverse_ratio=np.array([1.0 / a if a > 0.0 else 0.0 for a in accept]),
        photon_cdf=photon_cdf,
        state_angle_rad=np.asarray(settings.state_angle_rad, dtype=np.float32),
    )


def generate_photons(
    key: np.uint64,
    slot_start: int,
    slot_stop: int,
    settings: EmissionSettings,
    seed: np.uint64,
    *,
    eve_rng: Callable[[], np.random.Generator] | None = None,
    capacity: int | None = None,
) -> PhotonChunk:
    """Pulses of slots ``[slot_start, slot_stop)`` with at least one photon at the receiver.

    The number of photons reaching the receiver from a pulse of mean ``mu`` is Poisson with
    mean ``transmittance * mu``; only non-empty ones are returned, with their photon number.
    Cost is proportional to the number of returned pulses. ``seed`` drives the photon
    statistics; ``eve_rng`` makes the generator of an eavesdropper's random choices (called
    only when one is active). ``capacity``: the initial room for pulses (default: the
    expected number plus six standard deviations); it grows as needed and does not change
    the result.
    """
    span = slot_stop - slot_start
    tables = _emission_tables(settings)
    if tables.p_max <= 0.0 or span <= 0:
        return PhotonChunk(slot_start, slot_stop, np.empty(0, PHOTON_DTYPE), np.empty(0, np.int64))
    if capacity is None:
        expected = span * tables.p_max
        capacity = int(expected + 6.0 * math.sqrt(expected)) + 2 * _BLOCK
    photons = np.empty(capacity, PHOTON_DTYPE)
    m, pos, counter = 0, slot_start - 1, np.uint64(seed)
    while True:
        m, pos, counter, done = transmitter_photons(
            photons,
            m,
            pos,
            counter,
            key,
            slot_stop,
            tables.gap_scale,
            tables.gap_table,
            tables.class_threshold,
            tables.z_threshold,
            tables.sync_mix,
            settings.sync_seed is not None,
            tables.keep_threshold,
            tables.multi_threshold,
            tables.inverse_ratio,
            tables.photon_cdf,
            tables.state_angle_rad,
        )
        if done:
            break
        counter = np.uint64(counter)  # numba returns a Python int: keep the uint64 type
        grown = np.empty(2 * photons.shape[0] + _BLOCK, PHOTON_DTYPE)
        grown[:m].view(np.uint8)[:] = photons[:m].view(np.uint8)  # a byte copy: fast
        photons = grown
    photons = photons[:m]
    eve_known = np.empty(0, np.int64)
    if settings.eve_fraction > 0 and settings.eve_mode in ("intercept-resend", "beam-splitting"):
        rng = eve_rng() if eve_rng is not None else np.random.default_rng(int(seed))
        if settings.eve_mode == "intercept-resend":
            photons["angle_rad"] = intercept_resend(
                photons["angle_rad"], settings.eve_fraction, rng
            )
        else:
            # Eve replaces the lossy fiber by a lossless one and keeps what it would lose. By
            # Poisson splitting, her photon number is independent of what reached Bob.
            slots = photons["slot"]
            _, _, cls = slot_choices(
                key,
                slots,
                p_signal=settings.p_signal,
                p_decoy=settings.p_decoy,
                p_basis_z=settings.p_basis_z,
                sync_seed=settings.sync_seed,
            )
            mu_cls = np.asarray(settings.mu_per_class)[cls]
            p_eve = -np.expm1(-mu_cls * (1.0 - settings.transmittance))
            attacked = rng.random(slots.size) < settings.eve_fraction
            eve_known = slots[attacked & (rng.random(slots.size) < p_eve)]
    return PhotonChunk(slot_start, slot_stop, photons, eve_known)
