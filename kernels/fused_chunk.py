"""Placeholder: the Triton fused_chunk kernel is being written (issue 3)."""


def fused_chunk_based(q, k, v, scale=None, coeffs=(1.0, 1.0, 0.5), causal=True, normalize=True, eps=1e-6,
               layout="BHTD"):
    raise NotImplementedError("fused_chunk_based is not implemented yet")
