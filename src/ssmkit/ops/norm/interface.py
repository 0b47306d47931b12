"""Public (gated) RMSNorm functions: argument checks, backend dispatch, the Triton autograd node.

Backends: ``"reference"`` (``reference.py``, autograd through the formula), ``"torch"``
(``fused.py``, one autograd node with a hand-derived backward) and ``"triton"``
(``ssmkit.ops.norm.triton.rms_norm_gated_triton(x, weight, z, eps, group_size, norm_before_gate)
-> out``, with ``group_size`` always an int; differentiable through its own backward kernel).
"""

from __future__ import annotations

import torch

from ssmkit.ops import checks
from ssmkit.ops.dispatch import resolve
from ssmkit.ops.norm.fused import rms_norm_gated_fused
from ssmkit.ops.norm.reference import rms_norm_gated_ref

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
