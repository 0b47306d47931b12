"""Triton kernels for the Mamba-1 selective scan: one fused forward and one fused backward kernel.

``selective_scan_triton`` is what ``ssmkit.ops.selective_scan.interface`` calls with validated
arguments. Both kernels are registered as ``torch.library`` custom ops (``ssmkit::selective_scan_fwd``
and ``ssmkit::selective_scan_bwd``) with fake (shape-only) implementations and an autograd formula,
so ``torch.compile`` traces them without graph breaks and CUDA graphs can capture them: nothing on
the forward path reads tensor values on the host (packed-sequence bookkeeping stays on the device).

Importing this module imports Triton; the rest of ssmkit imports it lazily.
"""

# No ``from __future__ import annotations``: torch.library infers the operator schema from the
# evaluated annotations, and Optional[...] (rather than ``X | None``) is what torch 2.4+ accepts.
from typing import Optional  # noqa: UP035

import torch

from ssmkit.ops.common.eager import EagerAutograd, op_or_impl
from ssmkit.ops.selective_scan.triton.config import ScanConfig, choose_config
from ssmkit.ops.selective_scan.triton.scan_bwd import selective_scan_bwd
from ssmkit.ops.selective_scan.triton.scan_fwd import selective_scan_fwd

__all__ = ["selective_scan_triton"]

Tensor = torch.Tensor


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _num_seqs(u: Tensor, cu_seqlens: Optional[Tensor]) -> int:  # noqa: UP045
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else u.shape[0]


def _num_chunks(seqlen: int, num_seqs: int, block_l: int, varlen: bool) -> int:
    # Packed sequences use the blocks (multiples of block_l) their positions fall in, and two
    # neighbours can share one: at most cdiv(seqlen, block_l) + num_seqs blocks (known from shapes).
    return -(-seqlen // block_l) + (num_seqs if varlen else 0)


def _chunk_offsets(cu_seqlens: Optional[Tensor], block_l: int) -> Optional[Tensor]:  # noqa: UP045
    """Index of each packed sequence's first saved block state, computed on the device (no sync)."""
    if cu_seqlens is None:
        return None
    starts, ends = cu_seqlens[:-1].to(torch.int64), cu_seqlens[1:].to(torch.int64)
    blocks = torch.where(ends > starts, (ends + block_l - 1) // block_l - starts // block_l, 0)
    return torch.cumsum(blocks, 0) - blocks


def _time_major(tensor: Optional[Tensor]) -> Optional[Tensor]:  # noqa: UP045
    # The kernels read time blocks; a unit time stride makes those loads coalesced. Other strides
    # are passed through, so only a tensor with a strided time axis is copied (once).
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def _forward_configs(u: Tensor, B: Tensor, save_states: bool) -> ScanConfig:
    batch, dim, seqlen = u.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    if not save_states:
        return choose_config(dim, dstate, ngroups, seqlen, u.device, "forward")
    # The backward restarts from the states saved at its own block boundaries.
    backward = choose_config(dim, dstate, ngroups, seqlen, u.device, "backward")
    return choose_config(dim, dstate, ngroups, seqlen, u.device, "forward", block_l=backward.block_l)


def _scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],  # noqa: UP045
    z: Optional[Tensor],  # noqa: UP045
    delta_bias: Optional[Tensor],  # noqa: UP045
    initial_state: Optional[Tensor],  # noqa: UP045
    cu_seqlens: Optional[Tensor],  # noqa: UP045
    delta_softplus: bool,
    save_states: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns out (batch, dim, seqlen), last_state (num_seqs, dim, dstate) in the compute dtype,
    the block-start states (batch, dim, num_chunks, dstate) and the output before the z gate
    (batch, dim, seqlen); the last two are empty unless ``save_states`` (the second also without z)."""
    u, delta, z, B, C = (_time_major(t) for t in (u, delta, z, B, C))
    batch, dim, seqlen = u.shape
    dstate = B.shape[2]
    num_seqs = _num_seqs(u, cu_seqlens)
    config = _forward_configs(u, B, save_states)
    compute = _compute_dtype(u)
    out = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    last_state = torch.empty((num_seqs, dim, dstate), dtype=compute, device=u.device)
    if save_states:
        num_chunks = _num_chunks(seqlen, num_seqs, config.block_l, cu_seqlens is not None)
        chunk_states = torch.empty((batch, dim, num_chunks, dstate), dtype=compute, device=u.device)
    else:
        chunk_states = torch.empty(0, dtype=compute, device=u.device)
    # The backward needs the pre-gate output for dz; keeping it costs one (batch, dim, seqlen) write
    # instead of a second pass over the state indices there.
    keep_y = save_states and z is not None
    y_pregate = torch.empty((batch, dim, seqlen) if keep_y else (0,), dtype=u.dtype, device=u.device)
    selective_scan_fwd(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        initial_state,
        cu_seqlens,
        _chunk_offsets(cu_seqlens, config.block_l),
        delta_softplus,
        out,
        last_state,
        chunk_states if save_states else None,
        y_pregate if keep_y else None,
        config,
    )
    return out, last_state, chunk_states, y_pregate


# Registered from the plain function, which eager callers use directly (ssmkit.ops.common.eager).
_selective_scan_fwd_op = torch.library.custom_op("ssmkit::selective_scan_fwd", mutates_args=())(_scan_forward)


@_selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, save_states):
    batch, dim, seqlen = u.shape
    dstate = B.shape[2]
    num_seqs = _num_seqs(u, cu_seqlens)
    compute = _compute_dtype(u)
    out = u.new_empty((batch, dim, seqlen))
    last_state = u.new_empty((num_seqs, dim, dstate), dtype=compute)
    if save_states:
        config = _forward_configs(u, B, save_states)
        num_chunks = _num_chunks(seqlen, num_seqs, config.block_l, cu_seqlens is not None)
        chunk_states = u.new_empty((batch, dim, num_chunks, dstate), dtype=compute)
    else:
        chunk_states = u.new_empty(0, dtype=compute)
    keep_y = save_states and z is not None
    y_pregate = u.new_empty((batch, dim, seqlen) if keep_y else (0,))
    return out, last_state, chunk_states, y_pregate


def _scan_backward(
    dout: Tensor,
    dlast_state: Optional[Tensor],  # noqa: UP045
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],  # noqa: UP045
    z: Optional[Tensor],  # noqa: UP045
    delta_bias: Optional[Tensor],  # noqa: UP045
    has_initial_state: bool,
    cu_seqlens: Optional[Tensor],  # noqa: UP045
    chunk_states: Tensor,
    y_pregate: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state, each in its input's
    dtype; gradients of absent optional inputs are empty tensors."""
    dout, u, delta, z, B, C = (_time_major(t) for t in (dout, u, delta, z, B, C))
    batch, dim, seqlen = u.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    config = choose_config(dim, dstate, ngroups, seqlen, u.device, "backward")
    du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinitial = selective_scan_bwd(
        dout,
        dlast_state,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        has_initial_state,
        cu_seqlens,
        _chunk_offsets(cu_seqlens, config.block_l),
        chunk_states,
        y_pregate if z is not None else None,
        delta_softplus,
        config,
    )
    return (
        du,
        ddelta,
        dA.to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD.to(D.dtype) if D is not None else dD,
        dz,
        ddelta_bias.to(delta_bias.dtype) if delta_bias is not None else ddelta_bias,
        dinitial,
    )


_selective_scan_bwd_op = torch.library.custom_op("ssmkit::selective_scan_bwd", mutates_args=())(
    _scan_backward
)


@_selective_scan_bwd_op.register_fake
def _(
    dout,
    dlast_state,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    has_initial_state,
    cu_seqlens,
    chunk_states,
    y_pregate,
    delta_softplus,
):
    compute = _compute_dtype(u)
    empty = lambda: u.new_empty(0, dtype=compute)  # distinct: outputs may not alias each other
    num_seqs = _num_seqs(u, cu_seqlens)
    return (
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(delta, memory_format=torch.contiguous_format),
        torch.empty_like(A),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        torch.empty_like(D) if D is not None else empty(),
        torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else empty(),
        torch.empty_like(delta_bias) if delta_bias is not None else empty(),
        u.new_empty((num_seqs, u.shape[1], A.shape[1]), dtype=compute) if has_initial_state else empty(),
    )


_FORWARD_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "cu_seqlens")


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, save_states = inputs
    _, _, chunk_states, y_pregate = output
    ctx.delta_softplus = delta_softplus
    ctx.has_initial_state = initial_state is not None
    ctx.initial_state_dtype = initial_state.dtype if initial_state is not None else None
    ctx.saved_states = save_states
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, chunk_states, y_pregate)


def _backward(ctx, dout, dlast_state, _dchunk_states, _dy_pregate):
    u, delta, A, B, C, D, z, delta_bias, cu_seqlens, chunk_states, y_pregate = ctx.saved_tensors
    if not ctx.saved_states:
        raise RuntimeError(
            "ssmkit::selective_scan_fwd ran with save_states=False, so its block states needed by "
            "the backward were not kept; call it with save_states=True when gradients are wanted"
        )
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial = op_or_impl(
        _selective_scan_bwd_op, _scan_backward
    )(
        dout,
        dlast_state,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        ctx.has_initial_state,
        cu_seqlens,
        chunk_states,
        y_pregate,
        ctx.delta_softplus,
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta_bias if delta_bias is not None else None,
        dinitial.to(ctx.initial_state_dtype) if ctx.has_initial_state else None,
        None,
        None,
        None,
    )


_selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)
# chunk_states and y_pregate (outputs 2 and 3) only carry saved values to the backward.
_scan = EagerAutograd(_scan_forward, _setup_context, _backward, non_differentiable=(2, 3))


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],  # noqa: UP045
    z: Optional[Tensor],  # noqa: UP045
    delta_bias: Optional[Tensor],  # noqa: UP045
    delta_softplus: bool,
    return_last_state: bool,
    initial_state: Optional[Tensor],  # noqa: UP045
    cu_seqlens: Optional[Tensor],  # noqa: UP045
) -> tuple[Tensor, Optional[Tensor]]:  # noqa: UP045
    """Mamba-1 selective scan through the fused Triton kernels (differentiable in every tensor).

    u, delta, z: (batch, dim, seqlen)   A: (dim, dstate) real
    B, C: (batch, ngroups, dstate, seqlen); channel d reads group d // (dim // ngroups)
    D, delta_bias: (dim,) or None
    initial_state: (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens; or None
    cu_seqlens: (num_seqs + 1,) int32/int64 packed-sequence boundaries (batch 1), or None

    Returns out: (batch, dim, seqlen) in the dtype of u and, when return_last_state, the final
    state (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens, in fp32 (fp64 for
    fp64 inputs) whatever the input dtype; gradients flow through it too. Arguments are assumed
    valid (``selective_scan_fn`` checks them). The kernels compute in fp32 for bf16/fp16/fp32
    inputs and in fp64 for fp64 inputs.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    # The block states cost dim * dstate floats per time block; keep them only when a backward
    # can follow.
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last_state, _, _ = _scan(
        _selective_scan_fwd_op,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        initial_state,
        cu_seqlens,
        delta_softplus,
        save_states,
    )
    return out, (last_state if return_last_state else None)
