"""The steps before and after the scan that the PyTorch backends (``reference.py``, ``chunked.py``)
share word for word; kept in one place so the ground truth and the fast path cannot drift apart.
The Triton path does the same work inside its kernels (``triton/cumsum.py``, ``triton/chunk_scan.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.common import compute_dtype, process_dt, seq_idx_from_cu_seqlens


def prepare_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.dtype, torch.Tensor, torch.Tensor | None]:
    """The compute dtype, the processed step sizes and the sequence index of every position.

    x: (batch, seqlen, nheads, headdim)   dt: (batch, seqlen, nheads)   dt_bias: (nheads,)
    seq_idx: (batch, seqlen) int   cu_seqlens: (num_seqs + 1,) int
    Returns ``(dtype, dt, seq_idx)``: dt (batch, seqlen, nheads) in ``dtype``; seq_idx derived from
    cu_seqlens when only the latter is given (the backends may be called without the interface).
    """
    dtype = compute_dtype(x.dtype)
    if cu_seqlens is not None and seq_idx is None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    return dtype, process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype), seq_idx


def skip_and_gate(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """``(y + D x) * silu(z)``, each term only when given, in y's dtype (the compute dtype).

    y, x, z: (batch, seqlen, nheads, headdim)   D: (nheads,) or (nheads, headdim)
    """
    dtype = y.dtype
    if D is not None:
        y = y + x.to(dtype) * (D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y
