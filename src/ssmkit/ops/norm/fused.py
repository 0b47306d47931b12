"""PyTorch fast path for (gated) RMSNorm: one autograd node with a hand-derived backward.

Autograd through the reference keeps every intermediate (upcast x, gate, normalized values) alive
until backward; this path saves only the inputs and recomputes the cheap intermediates, which is
what the Triton kernels do as well.

Backward of y = a * r with r = (mean(a^2) + eps)^(-1/2) over one group, n = a * r:
    da = r * (dn - n * mean(dn * n))
"""

from __future__ import annotations

import torch

from ssmkit.ops.norm.reference import compute_dtype


def _silu_and_derivative(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sigmoid = torch.sigmoid(z)
    return z * sigmoid, sigmoid * (1 + z * (1 - sigmoid))


def _normalize(values: torch.Tensor, eps: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values: (rows, dim) -> normalized (rows, dim), rstd (rows, ngroups, 1)."""
    rows, dim = values.shape
    groups = values.view(rows, dim // group_size, group_size)
    rstd = torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)
    return (groups * rstd).view(rows, dim), rstd


def rms_norm_gated_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """x, z: (..., dim)   weight: (dim,). Returns out: (..., dim) in x's dtype (no autograd graph)."""
    dtype = compute_dtype(x, weight, z)
    dim = x.shape[-1]
    values = x.reshape(-1, dim).to(dtype)
    gate = None
    if z is not None:
        zc = z.reshape(-1, dim).to(dtype)
        gate = zc * torch.sigmoid(zc)
        if not norm_before_gate:
            values = values * gate
    normalized, _ = _normalize(values, eps, group_size)
    out = normalized * weight.to(dtype)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype).view(x.shape)


def rms_norm_gated_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``rms_norm_gated`` from the saved inputs.

    grad_out, x, z: (..., dim)   weight: (dim,)
    Returns (grad_x, grad_weight, grad_z or None), each in its input's dtype and shape.
    """
    dtype = compute_dtype(x, weight, z)
    dim = x.shape[-1]
    rows_x = x.reshape(-1, dim).to(dtype)
    dout = grad_out.reshape(-1, dim).to(dtype)
    w = weight.to(dtype)
    gate = gate_derivative = zc = None
    if z is not None:
        zc = z.reshape(-1, dim).to(dtype)
        gate, gate_derivative = _silu_and_derivative(zc)
    gated_before_norm = gate is not None and not norm_before_gate
    values = rows_x * gate if gated_before_norm else rows_x
    normalized, rstd = _normalize(values, eps, group_size)

    grad_z = None
    if gate is not None and norm_before_gate:
        grad_z = dout * normalized * w * gate_derivative
        dout = dout * gate
    grad_weight = (dout * normalized).sum(dim=0)
    grad_normalized = (dout * w).view(-1, dim // group_size, group_size)
    normalized_groups = normalized.view(-1, dim // group_size, group_size)
    projection = (grad_normalized * normalized_groups).mean(dim=-1, keepdim=True)
    grad_values = (rstd * (grad_normalized - normalized_groups * projection)).view(-1, dim)
    if gated_before_norm:
        grad_x = grad_values * gate
        grad_z = grad_values * rows_x * gate_derivative
    else:
        grad_x = grad_values
    grad_z_out = None if z is None else grad_z.to(z.dtype).view(z.shape)
    return grad_x.to(x.dtype).view(x.shape), grad_weight.to(weight.dtype), grad_z_out


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, norm_before_gate):
        ctx.save_for_backward(x, weight, z)
        ctx.config = (eps, group_size, norm_before_gate)
        return rms_norm_gated_forward(x, weight, z, eps, group_size, norm_before_gate)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, z = ctx.saved_tensors
        grad_x, grad_weight, grad_z = rms_norm_gated_backward(grad_out, x, weight, z, *ctx.config)
        return grad_x, grad_weight, grad_z, None, None, None


def rms_norm_gated_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """x, z: (..., dim)   weight: (dim,). Returns out: (..., dim) in x's dtype, differentiable."""
    return _RMSNormGated.apply(x, weight, z, eps, group_size, norm_before_gate)
