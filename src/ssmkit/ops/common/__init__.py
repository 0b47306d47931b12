"""Building blocks shared by the chunked operators (SSD today; any chunked scan tomorrow).

- :mod:`.dt` — compute dtype choice and Mamba's ``dt`` processing (bias, softplus, limits).
- :mod:`.chunking` — splitting a sequence into chunks, chunk cumsum, segment sums.
- :mod:`.state_passing` — carrying states from chunk to chunk, with resets.
- :mod:`.varlen` — packed sequences: ``seq_idx`` from ``cu_seqlens``, segment ids.
- :mod:`.inplace` — differentiable in-place decode steps (conv1d, SSM step): row updates and
  gradients of forward-only kernels by recomputation.
"""

from ssmkit.ops.common.chunking import chunk_cumsum, pad_to_chunks, segsum
from ssmkit.ops.common.dt import compute_dtype, process_dt
from ssmkit.ops.common.state_passing import state_passing
from ssmkit.ops.common.varlen import segment_ids, seq_idx_from_cu_seqlens

__all__ = [
    "chunk_cumsum",
    "compute_dtype",
    "pad_to_chunks",
    "process_dt",
    "segment_ids",
    "segsum",
    "seq_idx_from_cu_seqlens",
    "state_passing",
]
