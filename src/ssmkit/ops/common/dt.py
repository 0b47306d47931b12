"""Compute dtype and Mamba's ``dt`` processing, shared by every Mamba operator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_DT_LIMIT = (0.0, float("inf"))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: fp64 stays fp64, everything else (fp32, bf16, fp16) runs
    in fp32, because sums over long sequences in half precision lose too many digits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def process_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Apply ``dt_bias``, softplus and ``dt_limit`` exactly as ``mamba_ssm`` does, in ``dtype``.

    dt: (..., nheads)   dt_bias: (nheads,)
    Returns the step sizes, (..., nheads), in ``dtype``.

    The clamp runs only when ``dt_limit`` differs from the default ``(0, inf)``: ``mamba_ssm``
    leaves negative steps alone in that case, and so must we to give the same numbers.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        # threshold=20 matches mamba_ssm's kernels: above it softplus(x) == x to fp32 precision.
        dt = F.softplus(dt, threshold=20.0)
    lower, upper = float(dt_limit[0]), float(dt_limit[1])
    if (lower, upper) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=lower, max=upper)
    return dt
