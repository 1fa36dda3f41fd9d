"""Based linear attention kernels (installed as ``based_compile.kernels``).

- ``naive_parallel_based`` / ``naive_chunk_based``: plain-PyTorch references.
- ``parallel_based``: Triton parallel kernel (training; forward and backward).
- ``fused_chunk_based``: Triton fused-chunk kernel (long context, O(T) memory).
- ``chunked_based``: Triton chunkwise-parallel kernel, states in the symmetric basis (training and
  long prefill, O(T) memory).
- ``naive_chunkwise_based``: the chunked kernel's algorithm in plain PyTorch.
- ``recurrent_step`` (module): Triton kernels of one recurrent decoding step; ``naive_recurrent_step``
  its PyTorch reference.
"""
from .arguments import BasedArguments, check_arguments
from .chunked import chunked_based
from .fused_chunk import fused_chunk_based
from .naive import naive_chunk_based, naive_chunkwise_based, naive_parallel_based, naive_recurrent_step
from .parallel import parallel_based

__all__ = [
    "BasedArguments",
    "check_arguments",
    "naive_parallel_based",
    "naive_chunk_based",
    "naive_chunkwise_based",
    "naive_recurrent_step",
    "parallel_based",
    "fused_chunk_based",
    "chunked_based",
]
