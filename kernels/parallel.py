"""Placeholder: the Triton parallel kernel is being written (issue 3)."""


def parallel_based(q, k, v, scale=None, coeffs=(1.0, 1.0, 0.5), causal=True, normalize=True, eps=1e-6,
               layout="BHTD"):
    raise NotImplementedError("parallel_based is not implemented yet")
