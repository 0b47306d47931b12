"""Reference (gated) RMSNorm: the formula as written, evaluated in fp32 (fp64 stays fp64).

x, z: (..., dim)   weight: (dim,)   dim = ngroups * group_size
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: half-precision inputs are never reduced in half."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def rms_norm_gated_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """Gated RMSNorm over groups of ``group_size`` channels.

    x: (..., dim)   weight: (dim,)   z: (..., dim) or None
    norm_before_gate=True:  out = rmsnorm(x) * weight * silu(z)
    norm_before_gate=False: out = rmsnorm(x * silu(z)) * weight
    Returns out: (..., dim) in x's dtype.
    """
    dtype = compute_dtype(x, weight, z)
    values = x.to(dtype)
    gate = None
    if z is not None:
        z = z.to(dtype)
        gate = z * torch.sigmoid(z)
    if gate is not None and not norm_before_gate:
        values = values * gate
    dim = values.shape[-1]
    # Each group of channels gets its own root-mean-square.
    groups = values.reshape(*values.shape[:-1], dim // group_size, group_size)
    mean_square = groups.square().mean(dim=-1, keepdim=True)
    normalized = (groups / torch.sqrt(mean_square + eps)).reshape(values.shape)
    out = normalized * weight.to(dtype)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    multiplier: float,
    residual_dtype: torch.dtype,
    norm: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step as separate ops, the way an unfused block writes it.

    x: (..., dim) a branch output   residual: (..., dim) or None   weight: (dim,)
    residual_out = residual + multiplier * x (multiplier * x without a residual) in residual_dtype;
    out = rmsnorm(residual_out.to(weight.dtype)) * weight, in weight's dtype.
    norm(x, weight, z, eps, group_size, norm_before_gate): the RMSNorm to use (default: this file's).
    """
    norm = norm or rms_norm_gated_ref
    scaled = x if multiplier == 1.0 else x * multiplier
    residual_out = scaled if residual is None else residual.to(residual_dtype) + scaled
    residual_out = residual_out.to(residual_dtype)
    out = norm(residual_out.to(weight.dtype), weight, None, eps, weight.shape[0], True)
    return out, residual_out
