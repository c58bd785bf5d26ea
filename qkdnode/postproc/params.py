"""Parameters of the post-processing of one key block."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CascadeParams(_Strict):
    """Cascade schedule (:func:`qkdnode.postproc.cascade.schedule`). Block sizes are powers
    of two (so that sub-block parities form a dyadic tree that later passes reuse without
    disclosing anything new). Pass 1 and 2 correct nearly every error, an optional middle
    pass the few left over, and the check passes, each cutting the frame into 3-4 blocks of
    a fresh permutation, find the last ones (Martinez-Mateo, Pacher, Peev et al.,
    "Demystifying the information reconciliation protocol Cascade", QIC 15 (2015): few
    small-block passes, then many passes of about half the frame)."""

    first_block_factor: float = Field(
        0.8, gt=0, le=8, description="pass-1 block size ~ factor / QBER (rounded to 2^k)"
    )
    growth_factor: int = Field(
        4, ge=2, le=64, description="block size ratio of pass 2 to pass 1 (rounded to 2^k)"
    )
    middle_block_bits: int = Field(
        4096,
        ge=0,
        le=1 << 30,
        description="block size of pass 3 (rounded to 2^k), run when it lies between pass "
        "2's blocks and the check passes' blocks; 0: no middle pass",
    )
    check_passes: int = Field(
        7,
        ge=0,
        le=12,
        description="check passes on frames up to 2^16 bits: blocks of a quarter to a half of "
        "the frame (2^(c-2) for frames of 2^(c-1) to 2^c bits), each catching an error pair "
        "the earlier passes left with probability >= 2/3; 7 left no residual error in 1000 "
        "frames of 1e4 bits at 1, 2, 5 or 10 %",
    )
    check_passes_after_middle: int = Field(
        4,
        ge=0,
        le=12,
        description="check passes after the middle pass on frames of more than 2^16 bits: "
        "blocks of 2^(c-4) (8-16 blocks), each catching a pair with probability >= 7/8; 4 "
        "left no residual error in 1000 frames of 1e5 bits at 1, 2, 5 or 10 % (4 passes of "
        "3-4 blocks left 2 at 5 %, 7 none). Each check pass costs both sides a pass over "
        "the frame",
    )
    qber_floor: float = Field(0.005, gt=0, lt=0.5, description="QBER assumed at least this")
    frames: int = Field(
        2,
        ge=1,
        le=16,
        description="the key is cut into this many frames, reconciled concurrently: the "
        "receiver works on one frame's answers while the other frames' queries travel",
    )
    min_frame_bits: int = Field(
        1_000_000,
        ge=1000,
        description="fewer frames when frames would be shorter than this (below ~1e6 bits "
        "a frame's 100-200 round trips, not the work, set the pace: frames add messages only)",
    )


class PostprocParams(_Strict):
    """Security and source parameters of one block. Intensities are mean photon numbers."""

    eps_sec: float = Field(1e-10, gt=0, lt=1)
    eps_cor: float = Field(1e-15, gt=0, lt=1)
    qber_abort: float = Field(0.11, gt=0, lt=0.5, description="abort above this error rate")
    mu_signal: float = Field(0.5, gt=0, le=2)
    mu_decoy: float = Field(0.1, gt=0, le=2)
    mu_vacuum: float = Field(0.0, ge=0, le=0.1)
    mu_signal_lower: float | None = Field(
        None, gt=0, le=2, description="calibrated lower bound of mu_signal (None: mu_signal)"
    )
    mu_signal_upper: float | None = Field(None, gt=0, le=2)
    mu_decoy_lower: float | None = Field(None, gt=0, le=2)
    mu_decoy_upper: float | None = Field(None, gt=0, le=2)
    mu_vacuum_lower: float | None = Field(None, ge=0, le=0.1)
    mu_vacuum_upper: float | None = Field(
        None, ge=0, le=0.1, description="e.g. the modulator's finite extinction"
    )
    mu_scale_lower: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the true intensities are c * mu_k (mu_k in the class intervals) with one "
        "factor c common to the classes in [mu_scale_lower, mu_scale_upper]: meter "
        "calibration, tap-to-output attenuation and drift scale every class alike",
    )
    mu_scale_upper: float = Field(1.0, ge=1, le=2)
    decoy_statistics: Literal["chernoff", "hoeffding"] = Field(
        "chernoff", description="fluctuation bound of the decoy counts (see finitekey)"
    )
    p_signal: float = Field(0.6, gt=0, lt=1)
    p_decoy: float = Field(0.2, gt=0, lt=1)
    p_basis_z: float = Field(0.8, gt=0, lt=1)
    cascade: CascadeParams = CascadeParams()
    auth_reserve_bits: int = Field(
        4096, ge=0, multiple_of=256, description="final-key bits moved to the auth pool"
    )
    min_sifted_bits: int = Field(1000, ge=1)
    recv_timeout_s: float = Field(10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _check(self) -> PostprocParams:
        if not self.mu_signal > self.mu_decoy + self.mu_vacuum:
            raise ValueError("need mu_signal > mu_decoy + mu_vacuum (Lim et al. condition)")
        if self.mu_decoy <= self.mu_vacuum:
            raise ValueError("need mu_decoy > mu_vacuum")
        if self.p_signal + self.p_decoy >= 1:
            raise ValueError("p_signal + p_decoy must be < 1 (the rest is vacuum)")
        lo, hi = self.mu_bounds()
        names = ("mu_signal", "mu_decoy", "mu_vacuum")
        points = (self.mu_signal, self.mu_decoy, self.mu_vacuum)
        for name, point, a, b in zip(names, points, lo, hi, strict=True):
            if not a <= point <= b:
                raise ValueError(
                    f"need {name}_lower <= {name} <= {name}_upper, got {a}, {point}, {b}"
                )
        if not (lo[0] > hi[1] + hi[2] and lo[1] > hi[2]):
            raise ValueError(
                "intensity intervals overlap: need mu_signal_lower > mu_decoy_upper + "
                "mu_vacuum_upper and mu_decoy_lower > mu_vacuum_upper"
            )
        return self

    def mu_bounds(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(lower, upper) mean photon numbers of (signal, decoy, vacuum); an unset bound is
        the point value."""

        def pick(bound: float | None, point: float) -> float:
            return point if bound is None else bound

        lower = (
            pick(self.mu_signal_lower, self.mu_signal),
            pick(self.mu_decoy_lower, self.mu_decoy),
            pick(self.mu_vacuum_lower, self.mu_vacuum),
        )
        upper = (
            pick(self.mu_signal_upper, self.mu_signal),
            pick(self.mu_decoy_upper, self.mu_decoy),
            pick(self.mu_vacuum_upper, self.mu_vacuum),
        )
        return lower, upper

    @property
    def p_vacuum(self) -> float:
        return 1.0 - self.p_signal - self.p_decoy
