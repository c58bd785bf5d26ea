"""Post-processing: detections -> secret key between the two nodes.

One module per stage, each a pure numpy core plus a thin message layer in
:mod:`qkdnode.postproc.pipeline`:

- :mod:`.sifting` — double-click squashing, compact detection announcement, basis match.
- :mod:`.finitekey` — decoy-state finite-key bounds (Lim et al., PRA 89, 022307 (2014),
  multiplicative Chernoff bounds, intensities as intervals with a common factor); its parts
  are :mod:`.finitekey_model` (inputs and outputs), :mod:`.finitekey_tails` (statistical
  bounds) and :mod:`.finitekey_decoy` (decoy-state bounds).
- :mod:`.cascade` — Cascade error correction with batched, tree-reusing parity queries.
- :mod:`.verify` — universal-hash verification of the corrected key.
- :mod:`.leak` — what a block's messages disclose about the key, counted for its length.
- :mod:`.toeplitz` — Toeplitz privacy amplification by blocked FFT convolution.
- :mod:`.auth` — Wegman-Carter authentication (Poly1305 + one-time pads) and the key pool.
- :mod:`.transport` — the peer transport Protocol and a ZeroMQ PAIR implementation.
- :mod:`.theory` — asymptotic decoy-state key rate and the PLOB bound.
- :mod:`.optimize` — settings and block size that maximise the expected finite-key rate.
- :mod:`.linkfit` — the link (transmittance, background, optical error) a block measured.
"""
