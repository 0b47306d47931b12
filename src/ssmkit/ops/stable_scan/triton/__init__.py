"""Triton kernels for the stable state scan ("euler"): one fused forward and one fused backward.

``stable_scan_triton`` is what :func:`ssmkit.ops.stable_scan.interface.stable_scan` calls with
validated arguments. Both kernels are registered as ``torch.library`` custom ops
(``ssmkit::stable_scan_fwd`` and ``ssmkit::stable_scan_bwd``) with fake (shape-only)
implementations and an autograd formula, so ``torch.compile`` traces them without graph breaks;
eager calls go through :class:`ssmkit.ops.common.eager.EagerAutograd` (same launchers).

Importing this module imports Triton; the rest of ssmkit imports it lazily.
"""

# No ``from __future__ import annotations``: torch.library infers the operator schema from the
# evaluated annotations, and Optional[...] (rather than ``X | None``) is what torch 2.4+ accepts.
from typing import Optional  # noqa: UP035

import torch
import triton

from ssmkit.ops.common.eager import EagerAutograd, op_or_impl
from ssmkit.ops.stable_scan.triton.scan_bwd import stable_scan_bwd
from ssmkit.ops.stable_scan.triton.scan_fwd import stable_scan_fwd

__all__ = ["DEFAULT_CHUNK", "stable_scan_triton"]

Tensor = torch.Tensor

# Steps between the states the forward stores for the backward: the checkpoints cost 1/CHUNK of the
# state history, the backward's per-program scratch CHUNK state tiles.
DEFAULT_CHUNK = 32


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _launch_config(d_inner: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_D, num_warps). ``tl.dot`` needs tiles of at least 16. On a GPU 16 channels per
    program give the most programs (the time loop is sequential, so parallelism comes from batch
    rows and channel blocks); the values are not tuned on hardware yet. The CPU interpreter runs
    programs one after another, so there one program takes up to 64 channels."""
    if device.type == "cuda":
        return 16, 2
    return min(64, max(16, triton.next_power_of_2(d_inner))), 1


def _num_chunks(seqlen: int, chunk: int) -> int:
    return -(-seqlen // chunk)


def _eps_tensor(eps: float, x: Tensor) -> Tensor:
    # Passed as a tensor so that fp64 kernels see eps in fp64 (float scalars reach kernels as fp32).
    return torch.full((1,), eps, dtype=_compute_dtype(x), device=x.device)


def _scan_forward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
    initial_state: Optional[Tensor],  # noqa: UP045
    seq_idx: Optional[Tensor],  # noqa: UP045
    chunk: int,
    save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (batch, seqlen, d_inner) in x's dtype, the final state (batch, d_inner, d_state)
    in the compute dtype, and the checkpoints (batch, num_chunks, d_inner, d_state) (empty unless
    ``save_checkpoints``)."""
    batch, seqlen, d_inner = x.shape
    d_state = A.shape[0]
    compute = _compute_dtype(x)
    y = torch.empty(batch, seqlen, d_inner, dtype=x.dtype, device=x.device)
    final_state = torch.empty(batch, d_inner, d_state, dtype=compute, device=x.device)
    shape = (batch, _num_chunks(seqlen, chunk), d_inner, d_state) if save_checkpoints else (0,)
    checkpoints = torch.empty(shape, dtype=compute, device=x.device)
    block_d, num_warps = _launch_config(d_inner, x.device)
    stable_scan_fwd(
        x,
        dt,
        A,
        B,
        C,
        norm_weight,
        norm_bias,
        _eps_tensor(eps, x),
        initial_state,
        seq_idx,
        y,
        final_state,
        checkpoints if save_checkpoints else None,
        chunk,
        block_d,
        num_warps,
    )
    return y, final_state, checkpoints


_stable_scan_fwd_op = torch.library.custom_op("ssmkit::stable_scan_fwd", mutates_args=())(_scan_forward)


@_stable_scan_fwd_op.register_fake
def _(x, dt, A, B, C, norm_weight, norm_bias, eps, initial_state, seq_idx, chunk, save_checkpoints):
    batch, seqlen, d_inner = x.shape
    d_state = A.shape[0]
    compute = _compute_dtype(x)
    shape = (batch, _num_chunks(seqlen, chunk), d_inner, d_state) if save_checkpoints else (0,)
    return (
        x.new_empty((batch, seqlen, d_inner)),
        x.new_empty((batch, d_inner, d_state), dtype=compute),
        x.new_empty(shape, dtype=compute),
    )


def _scan_backward(
    dy: Tensor,
    dfinal: Optional[Tensor],  # noqa: UP045
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
    seq_idx: Optional[Tensor],  # noqa: UP045
    checkpoints: Tensor,
    has_initial_state: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, ddt, dA, dB, dC, dnorm_weight, dnorm_bias, dinitial_state, each in its input's
    dtype (dinitial_state in the compute dtype, empty without an initial state)."""
    block_d, num_warps = _launch_config(x.shape[2], x.device)
    dx, ddt, dA, dB, dC, dweight, dbias, dinitial = stable_scan_bwd(
        dy,
        dfinal,
        x,
        dt,
        A,
        B,
        C,
        norm_weight,
        norm_bias,
        _eps_tensor(eps, x),
        seq_idx,
        checkpoints,
        has_initial_state,
        chunk,
        block_d,
        num_warps,
    )
    return (
        dx.to(x.dtype),
        ddt.to(dt.dtype),
        dA.to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dweight.to(norm_weight.dtype),
        dbias.to(norm_bias.dtype),
        dinitial,
    )


_stable_scan_bwd_op = torch.library.custom_op("ssmkit::stable_scan_bwd", mutates_args=())(_scan_backward)


@_stable_scan_bwd_op.register_fake
def _(dy, dfinal, x, dt, A, B, C, norm_weight, norm_bias, eps, seq_idx, checkpoints, has_initial, chunk):
    batch, _, d_inner = x.shape
    d_state = A.shape[0]
    compute = _compute_dtype(x)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(dt, memory_format=torch.contiguous_format),
        torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B, memory_format=torch.contiguous_format),
        torch.empty_like(C, memory_format=torch.contiguous_format),
        torch.empty_like(norm_weight, memory_format=torch.contiguous_format),
        torch.empty_like(norm_bias, memory_format=torch.contiguous_format),
        x.new_empty((batch, d_inner, d_state) if has_initial else (0,), dtype=compute),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, norm_weight, norm_bias, eps, initial_state, seq_idx, chunk, save_checkpoints = inputs
    ctx.eps, ctx.chunk, ctx.saved_checkpoints = eps, chunk, save_checkpoints
    ctx.has_initial_state = initial_state is not None
    ctx.initial_state_dtype = initial_state.dtype if initial_state is not None else None
    ctx.save_for_backward(x, dt, A, B, C, norm_weight, norm_bias, seq_idx, output[2])


def _backward(ctx, dy, dfinal, _dcheckpoints):
    x, dt, A, B, C, norm_weight, norm_bias, seq_idx, checkpoints = ctx.saved_tensors
    if not ctx.saved_checkpoints:
        raise RuntimeError(
            "ssmkit::stable_scan_fwd ran with save_checkpoints=False, so the states its backward "
            "restarts from were not kept; call it with save_checkpoints=True when gradients are wanted"
        )
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dweight, dbias, dinitial = op_or_impl(_stable_scan_bwd_op, _scan_backward)(
        dy,
        dfinal,
        x,
        dt,
        A,
        B,
        C,
        norm_weight,
        norm_bias,
        ctx.eps,
        seq_idx,
        checkpoints,
        ctx.has_initial_state,
        ctx.chunk,
    )
    dinitial = dinitial.to(ctx.initial_state_dtype) if ctx.has_initial_state else None
    return dx, ddt, dA, dB, dC, dweight, dbias, None, dinitial, None, None, None


_stable_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)
# The checkpoints (output 2) only carry saved values to the backward.
_scan = EagerAutograd(_scan_forward, _setup_context, _backward, non_differentiable=(2,))


def stable_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
    initial_state: Optional[Tensor] = None,  # noqa: UP045
    seq_idx: Optional[Tensor] = None,  # noqa: UP045
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """The "euler" stable state scan through the fused Triton kernels (differentiable in every
    floating tensor). Shapes as in :func:`ssmkit.ops.stable_scan.stable_scan`; arguments are
    assumed valid. chunk: steps between the states kept for the backward.
    Returns y (batch, seqlen, d_inner) and the final state (batch, d_inner, d_state)."""
    tensors = (x, dt, A, B, C, norm_weight, norm_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, final_state, _ = _scan(
        _stable_scan_fwd_op,
        x,
        dt,
        A,
        B,
        C,
        norm_weight,
        norm_bias,
        float(eps),
        initial_state,
        seq_idx,
        int(chunk),
        save,
    )
    return y, final_state
