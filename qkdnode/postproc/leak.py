"""What the classical channel discloses about a block's sifted Z key, and how it is paid for.

The finite-key length (:mod:`.finitekey`, Lim et al. eq. (1)) subtracts ``lambda_EC``, the
information that error correction and verification disclose, and ``log2(2 / eps_cor)`` for
the verification hash. :class:`BlockLeak` is that disclosure of one block, item by item; the
pipeline fills it from what it actually sent and received, and :meth:`BlockLeak.lambda_ec`
is what it passes to the formula. Every message of a block, field by field, is classified
in docs/architecture.md ("Leak accounting"); ``tests/postproc/test_leak_audit.py`` captures
the wire and checks the classification and the count.

Items:

* ``ec_parity_bits`` — the transmitter's Cascade answers (``ec_a``): one bit per parity sent,
  counted by :class:`.cascade.CascadeResponder` as it answers.
* ``verification_bits`` — the verification tag (``verify``), 128 bits. The formula's own
  ``log2(2 / eps_cor)`` term pays for part of it; :meth:`lambda_ec` adds the rest.
* ``error_count_bits`` — the receiver's total number of Z-basis errors (``ec_q`` ``done``):
  an integer in ``0 .. n_z``, at most ``bit_length(n_z)`` bits (:func:`integer_bits`).
* ``vacuum_credit_bits`` — the receiver's messages after sifting (its Cascade queries, the
  error count, the verification answer) are functions of public data and of the error
  pattern ``e = key_a XOR key_b``, not of the key itself. For single-photon events the
  error pattern costs nothing: measuring ``Z_A Z_B`` on a pair commutes with ``X_A X_B``, so
  the phase-error bound behind ``s_Z1 (1 - h(phi_Z))`` holds with ``e`` given to the
  adversary. For vacuum events it does not: the adversary may know the receiver's bit there
  (dark counts she caused), and ``e`` then reveals the transmitter's. The whole vacuum
  credit ``s_Z0`` is therefore withdrawn, whatever the receiver's messages carry (this also
  covers side channels of them that depend on ``e`` only, such as their timing). Counting
  only the transmitter's parities, as Cascade implementations commonly do, misses this
  (Tupkary and Lütkenhaus, "Using Cascade in quantum key distribution", arXiv:2307.00576
  (2023)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def integer_bits(largest: int) -> int:
    """Bits that an integer known to lie in ``0 .. largest`` can carry: ``ceil(log2(largest +
    1))``."""
    if largest < 0:
        raise ValueError(f"largest must be >= 0, got {largest}")
    return int(largest).bit_length()


@dataclass(frozen=True)
class BlockLeak:
    """Disclosure about one block's sifted Z key, in bits (see the module docstring)."""

    ec_parity_bits: int = 0
    verification_bits: int = 0
    error_count_bits: int = 0
    vacuum_credit_bits: float = 0.0

    @property
    def total_bits(self) -> float:
        """Everything disclosed, the verification tag included."""
        return (
            self.ec_parity_bits
            + self.verification_bits
            + self.error_count_bits
            + self.vacuum_credit_bits
        )

    def lambda_ec(self, eps_cor: float) -> float:
        """``lambda_EC`` of the finite-key formula: :attr:`total_bits` less the
        ``log2(2 / eps_cor)`` that the formula subtracts for the verification itself (never
        less than the other items: a tag shorter than that term is not credited)."""
        verification_extra = max(0.0, self.verification_bits - math.log2(2.0 / eps_cor))
        return (
            self.ec_parity_bits
            + self.error_count_bits
            + self.vacuum_credit_bits
            + verification_extra
        )

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_bits": self.total_bits}
