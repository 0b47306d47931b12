"""Triton kernels for the Mamba-2 SSD chunked scan, forward and backward.

One file per stage (cumsum, chunk_state, state_passing, bmm, chunk_scan and their backwards;
varlen builds the chunk layout of packed sequences); combined.py composes them. The two passes are
registered as the custom ops ``ssmkit::ssd_fwd`` and ``ssmkit::ssd_bwd`` with fake (shape)
functions and an autograd formula, so torch.compile traces them without graph breaks and CUDA
graphs can capture them (no host synchronisation on the forward path).

Only :func:`ssd_triton` is meant to be called, by ``ssmkit.ops.ssd.interface`` with checked
arguments. This package imports triton; nothing imports it unless the Triton backend is chosen.
"""

# No ``from __future__ import annotations`` here: torch.library infers the custom ops' schemas from
# real annotation objects.
import math

import torch

from ssmkit.ops.common import compute_dtype
from ssmkit.ops.common.eager import EagerAutograd, op_or_impl
from ssmkit.ops.ssd.triton.combined import ssd_backward, ssd_forward
from ssmkit.ops.ssd.triton.varlen import num_chunks

__all__ = ["ssd_triton"]


def _num_seqs(cu_seqlens: torch.Tensor | None) -> int | None:
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else None


def _ssd_fwd_impl(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, final states fp32, varlen states fp32 (empty when unpacked), states entering
    each chunk, processed dt, cumsum); the last three are kept for the backward."""
    out, final, varlen, states, dt_out, cs = ssd_forward(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D,
        z,
        dt_bias,
        initial_states,
        seq_idx,
        cu_seqlens,
        dt_softplus,
        (dt_min, dt_max),
    )
    if varlen is None:
        varlen = final.new_empty(0, *final.shape[1:])
    return out, final, varlen, states, dt_out, cs


# Registered from the plain function, which eager callers use directly (ssmkit.ops.common.eager).
_ssd_fwd = torch.library.custom_op("ssmkit::ssd_fwd", mutates_args=())(_ssd_fwd_impl)


@_ssd_fwd.register_fake
def _ssd_fwd_fake(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, *options):
    # The shapes follow from x, B, chunk_size and cu_seqlens alone; options: dt_softplus, dt_min, dt_max.
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    nseqs = _num_seqs(cu_seqlens)
    nchunks = num_chunks(seqlen, chunk_size, nseqs)
    f32 = torch.float32
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(batch, nheads, headdim, dstate, dtype=f32),
        x.new_empty(nseqs or 0, nheads, headdim, dstate, dtype=f32),
        x.new_empty(batch, nchunks, nheads, headdim, dstate, dtype=f32),
        x.new_empty(batch, nheads, nchunks, chunk_size, dtype=f32),
        x.new_empty(batch, nheads, nchunks, chunk_size, dtype=f32),
    )


def _ssd_bwd_impl(
    dout: torch.Tensor,
    dfinal: torch.Tensor | None,
    dvarlen: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    states: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
) -> list[torch.Tensor]:
    """Returns [dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states], dx in x's dtype and the
    others in fp32; a gradient whose input was None comes back as an empty tensor (custom ops
    cannot return None)."""
    grads = ssd_backward(
        dout,
        dfinal,
        dvarlen,
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D,
        z,
        dt_bias,
        initial_states,
        seq_idx,
        cu_seqlens,
        dt_softplus,
        (dt_min, dt_max),
        states,
        dt_out,
        cs,
    )
    return [g if g is not None else x.new_empty(0, dtype=torch.float32) for g in grads]


_ssd_bwd = torch.library.custom_op("ssmkit::ssd_bwd", mutates_args=())(_ssd_bwd_impl)


@_ssd_bwd.register_fake
def _ssd_bwd_fake(dout, dfinal, dvarlen, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, *rest):
    # Every gradient is shaped like its input; rest: seq_idx, cu_seqlens, options, saved tensors.
    f32 = torch.float32

    def like(t):
        return t.new_empty(t.shape, dtype=f32) if t is not None else x.new_empty(0, dtype=f32)

    # dx is written by the kernel in x's dtype; the fake must say so or Inductor plans wrong buffers.
    return [
        x.new_empty(x.shape),
        like(dt),
        like(A),
        like(B),
        like(C),
        like(D),
        like(z),
        like(dt_bias),
        like(initial_states),
    ]


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, *options = inputs
    _, _, _, states, dt_out, cs = output
    ctx.save_for_backward(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, states, dt_out, cs
    )
    ctx.options = (chunk_size, *options)  # chunk_size, dt_softplus, dt_min, dt_max
    ctx.varlen = cu_seqlens is not None


def _backward(ctx, dout, dfinal, dvarlen, _dstates, _ddt_out, _dcs):
    # The last three outputs only carry saved values to the backward; they have no gradient.
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, states, dt_out, cs = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max = ctx.options
    grads = op_or_impl(_ssd_bwd, _ssd_bwd_impl)(
        dout,
        dfinal,
        dvarlen if ctx.varlen else None,
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D,
        z,
        dt_bias,
        initial_states,
        seq_idx,
        cu_seqlens,
        dt_softplus,
        dt_min,
        dt_max,
        states,
        dt_out,
        cs,
    )
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = (
        g.to(t.dtype) if t is not None else None for g, t in zip(grads, inputs)
    )
    return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, dinit, None, None, None, None, None


_ssd_fwd.register_autograd(_backward, setup_context=_setup_context)
# states, dt_out and cs (outputs 3-5) only carry saved values to the backward.
_ssd = EagerAutograd(_ssd_fwd_impl, _setup_context, _backward, non_differentiable=(3, 4, 5))


def ssd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mamba-2 SSD chunked scan on Triton kernels (arguments already checked by the interface).

    x: (batch, seqlen, nheads, headdim)   dt: (batch, seqlen, nheads)   A: (nheads,)
    B, C: (batch, seqlen, ngroups, dstate)   D: None, (nheads,) or (nheads, headdim)   z: None or like x
    dt_bias: None or (nheads,)   initial_states: None or (batch, nheads, headdim, dstate), or
    (num_seqs, nheads, headdim, dstate) with cu_seqlens   seq_idx: None or (batch, seqlen) int32
    cu_seqlens: None or (num_seqs + 1,) int (batch 1; each packed sequence gets its own chunks, so
    seq_idx is not needed then).
    state_t = exp(dt_t A) state_{t-1} + dt_t B_t x_t^T;  out_t = (C_t . state_t + D x_t) * silu(z_t)
    Returns (out like x, final states (batch, nheads, headdim, dstate) or None, varlen states
    (num_seqs, nheads, headdim, dstate) or None); out in x's dtype, the states in fp32 (fp64 for
    fp64 inputs). fp64 inputs run in fp32 (the
    kernels' tl.dot has no fp64 path on every GPU) and are cast back.
    """
    dtype = x.dtype

    def kernel_dtype(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.float() if t is not None and t.dtype == torch.float64 else t

    x, dt, A, B, C, D, z, dt_bias, initial_states = [
        kernel_dtype(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)
    ]
    if cu_seqlens is not None:
        seq_idx = None  # the packed layout already keeps every chunk inside one sequence
    out, final, varlen, _, _, _ = _ssd(
        _ssd_fwd,
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D,
        z,
        dt_bias,
        initial_states,
        seq_idx,
        cu_seqlens,
        dt_softplus,
        float(dt_limit[0]),
        float(dt_limit[1]),
    )
    # States come back in the compute dtype, as from the other backends: fp32, or fp64 for fp64.
    state_dtype = compute_dtype(dtype)
    final_states = final.to(state_dtype) if return_final_states else None
    varlen_states = varlen.to(state_dtype) if return_varlen_states and cu_seqlens is not None else None
    return out.to(dtype), final_states, varlen_states
