"""Triton gated RMSNorm, registered as ``ssmkit::rms_norm_gated_fwd`` / ``ssmkit::rms_norm_gated_bwd``,
and the fused residual add + RMSNorm of pre-norm blocks, ``ssmkit::add_rms_norm`` (forward only).

The forward op returns the output and the per-(row, group) reciprocal RMS the backward reuses; its
autograd formula is registered with ``torch.library.register_autograd`` (the custom-op form of an
``autograd.Function``), so torch.compile traces the pair without graph breaks.
"""

from __future__ import annotations

import contextlib

import torch

from ssmkit.ops.common.eager import EagerAutograd, op_or_impl
from ssmkit.ops.norm.triton.add_norm import add_rms_norm_fwd
from ssmkit.ops.norm.triton.norm_bwd import rms_norm_gated_bwd
from ssmkit.ops.norm.triton.norm_fwd import MAX_GROUP_SIZE, rms_norm_gated_fwd

__all__ = ["add_rms_norm_triton", "rms_norm_gated_triton"]


def _device_context(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device: make it the device of the tensors.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _rstd_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _norm_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dim = x.shape[-1]
    x2d = x.reshape(-1, dim)
    z2d = z.reshape(-1, dim) if z is not None else None
    rows = x2d.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows, dim // group_size), dtype=_rstd_dtype(x, weight, z), device=x.device)
    if rows > 0:
        with _device_context(x):
            rms_norm_gated_fwd(x2d, weight, z2d, eps, group_size, norm_before_gate, out.view(rows, dim), rstd)
    return out, rstd


_rms_norm_gated_fwd_op = torch.library.custom_op(
    "ssmkit::rms_norm_gated_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? z, float eps, int group_size, bool norm_before_gate) "
    "-> (Tensor, Tensor)",
)(_norm_fwd_impl)


@_rms_norm_gated_fwd_op.register_fake
def _(x, weight, z, eps, group_size, norm_before_gate):
    dim = x.shape[-1]
    rows = x.numel() // dim
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty((rows, dim // group_size), dtype=_rstd_dtype(x, weight, z), device=x.device),
    )


def _norm_bwd_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    rstd: torch.Tensor,
    group_size: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx, dz (an empty tensor when z is None: custom ops cannot return None) and dweight."""
    dim = x.shape[-1]
    x2d = x.reshape(-1, dim)
    dy2d = dy.reshape(-1, dim)
    z2d = z.reshape(-1, dim) if z is not None else None
    rows = x2d.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dz = torch.empty(
        x.shape if z is not None else (0,), dtype=z.dtype if z is not None else x.dtype, device=x.device
    )
    if rows == 0:
        return dx, dz, torch.zeros_like(weight)
    with _device_context(x):
        dweight = rms_norm_gated_bwd(
            dy2d,
            x2d,
            weight,
            z2d,
            rstd,
            group_size,
            norm_before_gate,
            dx.view(rows, dim),
            dz.view(rows, dim) if z is not None else None,
        )
    return dx, dz, dweight.to(weight.dtype)


_rms_norm_gated_bwd_op = torch.library.custom_op(
    "ssmkit::rms_norm_gated_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor? z, Tensor rstd, int group_size, "
    "bool norm_before_gate) -> (Tensor, Tensor, Tensor)",
)(_norm_bwd_impl)


@_rms_norm_gated_bwd_op.register_fake
def _(dy, x, weight, z, rstd, group_size, norm_before_gate):
    dz = torch.empty(
        x.shape if z is not None else (0,), dtype=z.dtype if z is not None else x.dtype, device=x.device
    )
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dz, torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, z, eps, group_size, norm_before_gate = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, z, rstd)
    ctx.group_size = group_size
    ctx.norm_before_gate = norm_before_gate


def _backward(ctx, grad_out, grad_rstd):
    # rstd is an auxiliary output for the backward only; callers never differentiate through it.
    x, weight, z, rstd = ctx.saved_tensors
    dx, dz, dweight = op_or_impl(_rms_norm_gated_bwd_op, _norm_bwd_impl)(
        grad_out, x, weight, z, rstd, ctx.group_size, ctx.norm_before_gate
    )
    return dx, dweight, dz if z is not None else None, None, None, None


torch.library.register_autograd("ssmkit::rms_norm_gated_fwd", _backward, setup_context=_setup_context)
# rstd (output 1) only carries a saved value to the backward.
_norm = EagerAutograd(_norm_fwd_impl, _setup_context, _backward, non_differentiable=(1,))


def rms_norm_gated_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """Gated RMSNorm over groups of ``group_size`` channels, forward and backward in Triton.

    x: (..., dim)   weight: (dim,)   z: (..., dim) or None (plain RMSNorm)
    norm_before_gate=True: rmsnorm(x) * weight * silu(z); False: rmsnorm(x * silu(z)) * weight.
    Returns out: (..., dim) in x's dtype; gradients flow to x, z and weight. Computes in fp32 (fp64
    for fp64 inputs). Arguments are validated by the interface.
    """
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(
            f"group_size must be at most {MAX_GROUP_SIZE} for the Triton kernels (a group is normalised "
            f"in one tile), got {group_size}; use backend='torch'"
        )
    out, _ = _norm(_rms_norm_gated_fwd_op, x, weight, z, eps, group_size, norm_before_gate)
    return out


def _add_norm_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    multiplier: float,
    residual_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_dtype None: the new residual is x itself and is not written; an empty tensor stands
    for it (a custom op may not return its input)."""
    dim = x.shape[-1]
    x2d = x.reshape(-1, dim)
    rows = x2d.shape[0]
    out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    residual_out = torch.empty(
        x.shape if residual_dtype is not None else (0,), dtype=residual_dtype or x.dtype, device=x.device
    )
    if rows > 0 and dim > 0:
        with _device_context(x):
            add_rms_norm_fwd(
                x2d,
                residual.reshape(-1, dim) if residual is not None else None,
                weight,
                eps,
                multiplier,
                out.view(rows, dim),
                residual_out.view(rows, dim) if residual_dtype is not None else None,
            )
    return out, residual_out


_add_rms_norm_op = torch.library.custom_op(
    "ssmkit::add_rms_norm",
    mutates_args=(),
    schema="(Tensor x, Tensor? residual, Tensor weight, float eps, float multiplier, "
    "ScalarType? residual_dtype) -> (Tensor, Tensor)",
)(_add_norm_impl)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, multiplier, residual_dtype):
    return (
        torch.empty(x.shape, dtype=weight.dtype, device=x.device),
        torch.empty(
            x.shape if residual_dtype is not None else (0,), dtype=residual_dtype or x.dtype, device=x.device
        ),
    )


def add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    multiplier: float,
    residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one kernel, forward only (the interface differentiates the
    unfused ops instead).

    x: (..., dim)   residual: (..., dim) or None   weight: (dim,)
    Returns out = rmsnorm(residual_out.to(weight.dtype)) * weight in weight's dtype and
    residual_out = residual + multiplier * x in residual_dtype, which is x itself when there is no
    residual, multiplier is 1 and residual_dtype is x's. Arguments are validated by the interface.
    """
    if x.shape[-1] > MAX_GROUP_SIZE:
        raise ValueError(
            f"x must have at most {MAX_GROUP_SIZE} channels for the Triton kernel (a row is normalised "
            f"in one tile), got {x.shape[-1]}; use backend='torch'"
        )
    alias = residual is None and multiplier == 1.0 and residual_dtype == x.dtype
    out, residual_out = op_or_impl(_add_rms_norm_op, _add_norm_impl)(
        x, residual, weight, eps, multiplier, None if alias else residual_dtype
    )
    return out, x if alias else residual_out
