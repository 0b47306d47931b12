"""Public (gated) RMSNorm functions: argument checks, backend dispatch, the Triton autograd node.

Backends: ``"reference"`` (``reference.py``, autograd through the formula), ``"torch"``
(``fused.py``, one autograd node with a hand-derived backward) and ``"triton"``
(``ssmkit.ops.norm.triton.rms_norm_gated_triton(x, weight, z, eps, group_size, norm_before_gate)
-> out``, with ``group_size`` always an int; differentiable through its own backward kernel).

``add_rms_norm`` (a pre-norm block's residual add followed by the next RMSNorm) is the unfused ops of
``reference.add_rms_norm_ref`` on every backend, except that the Triton backend runs one fused
kernel (``ssmkit.ops.norm.triton.add_rms_norm_triton``) when no gradient is needed: the decode step
of a small model is bound by launches, not bytes. Training keeps the differentiable unfused ops.
"""

from __future__ import annotations

import torch

from ssmkit.ops import checks
from ssmkit.ops.common import inplace
from ssmkit.ops.dispatch import resolve
from ssmkit.ops.norm.fused import rms_norm_gated_fused
from ssmkit.ops.norm.reference import add_rms_norm_ref, rms_norm_gated_ref

_OP = "ssmkit.ops.norm"


def _check(x: object, weight: object, z: object, eps: object, group_size: object) -> int:
    """Validate the arguments; return the resolved group size."""
    x = checks.tensor("x", x)
    weight = checks.tensor("weight", weight)
    z = checks.tensor("z", z, optional=True)
    checks.floating("x", x)
    checks.floating("weight", weight)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., dim) with at least one dimension, got {tuple(x.shape)}")
    dim = x.shape[-1]
    checks.shape("weight", weight, [("dim", dim)])
    if z is not None:
        checks.floating("z", z)
        if z.shape != x.shape:
            raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    checks.same_device("x", x, weight=weight, z=z)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if group_size is None:
        return dim
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    checks.divisible("dim", dim, "group_size", group_size)
    return group_size


def rms_norm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Gated RMSNorm, normalising each group of ``group_size`` channels separately.

    x: (..., dim)   weight: (dim,)   z: (..., dim) or None   group_size divides dim (None = dim)
    norm_before_gate=True:  out = rmsnorm(x) * weight * silu(z)
    norm_before_gate=False: out = rmsnorm(x * silu(z)) * weight   (Mamba-2's choice)
    Computes in fp32 (fp64 for fp64 inputs). Returns out: (..., dim) in x's dtype.
    """
    group_size = _check(x, weight, z, eps, group_size)
    eps = float(eps)
    implementation = resolve(_OP, backend, x.device)
    if implementation == "reference":
        return rms_norm_gated_ref(x, weight, z, eps, group_size, norm_before_gate)
    if implementation == "torch":
        return rms_norm_gated_fused(x, weight, z, eps, group_size, norm_before_gate)
    from ssmkit.ops.norm.triton import rms_norm_gated_triton

    return rms_norm_gated_triton(x, weight, z, eps, group_size, norm_before_gate)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight.

    x: (..., dim)   weight: (dim,). Computes in fp32 (fp64 for fp64 inputs).
    Returns out: (..., dim) in x's dtype.
    """
    return rms_norm_gated(x, weight, None, eps, None, True, backend=backend)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    multiplier: float = 1.0,
    residual_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step: add a branch output to the residual stream, then RMSNorm the sum.

    x: (..., dim) the branch output   residual: (..., dim) or None   weight: (dim,)
    residual_out = residual + multiplier * x (multiplier * x when residual is None), in
        residual_dtype (None: the promoted dtype of residual and x; x's without a residual)
    out = rmsnorm(residual_out.to(weight.dtype)) * weight, in weight's dtype
    Returns (out, residual_out); residual_out is x itself when there is nothing to add or convert.
    The norm computes in fp32 (fp64 for fp64 inputs).
    """
    x = checks.tensor("x", x)
    residual = checks.tensor("residual", residual, optional=True)
    weight = checks.tensor("weight", weight)
    checks.floating("x", x)
    checks.floating("weight", weight)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., dim) with at least one dimension, got {tuple(x.shape)}")
    checks.shape("weight", weight, [("dim", x.shape[-1])])
    if residual is not None:
        checks.floating("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    checks.same_device("x", x, residual=residual, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise ValueError(f"multiplier must be a number, got {multiplier!r}")
    if residual_dtype is None:
        residual_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    elif not isinstance(residual_dtype, torch.dtype) or not residual_dtype.is_floating_point:
        raise ValueError(f"residual_dtype must be a floating torch.dtype or None, got {residual_dtype!r}")
    eps, multiplier = float(eps), float(multiplier)

    implementation = resolve(_OP, backend, x.device)
    if implementation == "triton" and _fusable(x, residual, weight, multiplier, residual_dtype):
        from ssmkit.ops.norm.triton import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps, multiplier, residual_dtype)
    if implementation == "reference":
        norm = rms_norm_gated_ref
    elif implementation == "torch":
        norm = rms_norm_gated_fused
    else:
        from ssmkit.ops.norm.triton import rms_norm_gated_triton as norm
    return add_rms_norm_ref(x, residual, weight, eps, multiplier, residual_dtype, norm)


def _fusable(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    multiplier: float,
    residual_dtype: torch.dtype,
) -> bool:
    """Whether the fused kernel gives what the unfused ops give: it has no backward, and Triton
    passes a float argument as fp32, which would round an fp64 computation's multiplier."""
    if inplace.needs_grad(x, residual, weight):
        return False
    fp64 = torch.float64 in (x.dtype, weight.dtype, residual_dtype) or (
        residual is not None and residual.dtype == torch.float64
    )
    return not (fp64 and multiplier != 1.0)
