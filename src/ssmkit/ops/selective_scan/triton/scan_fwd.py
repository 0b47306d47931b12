"""Fused forward kernel of the Mamba-1 selective scan.

One program owns ``BLOCK_D`` channels of one sequence and walks that sequence in time blocks of
``BLOCK_L`` steps. Per block it loads delta, u (and z) once as (BLOCK_D, BLOCK_L) tiles whose time
axis is spread over the threads (8 consecutive steps per thread for 16-bit inputs), then loops over
the state indices n: discretize (``exp(delta * A[:, n])``, ``delta * u * B[n]``), run the
recurrence as an associative scan along time, and accumulate ``y += C[n] * h``. Looping over n
keeps the live tiles small (a 3-d (channels, dstate, time) tile in registers was 5x slower on an
H100: its scan and its sum over dstate went through warp shuffles for every element) and sums over
dstate without any cross-thread reduction. Only the gated output is written. The states crossing
block boundaries stay in registers; for the backward pass the state at the start of every block
(``SAVE_STATES``) and the output before the z gate are stored, ``dim * dstate`` floats per block
instead of the whole ``dim * dstate * seqlen`` history.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.selective_scan.triton.config import ScanConfig
from ssmkit.ops.selective_scan.triton.scan_common import column, forward_states, softplus


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    initial_state_ptr,
    cu_seqlens_ptr,
    chunk_offsets_ptr,
    out_ptr,
    last_state_ptr,
    chunk_states_ptr,
    y_ptr,
    dim,
    dstate,
    seqlen,
    dim_per_group,
    stride_u_b,
    stride_u_d,
    stride_u_l,
    stride_delta_b,
    stride_delta_d,
    stride_delta_l,
    stride_z_b,
    stride_z_d,
    stride_z_l,
    stride_out_b,
    stride_out_d,
    stride_out_l,
    stride_A_d,
    stride_A_n,
    stride_B_b,
    stride_B_g,
    stride_B_n,
    stride_B_l,
    stride_C_b,
    stride_C_g,
    stride_C_n,
    stride_C_l,
    stride_D,
    stride_delta_bias,
    stride_h0_s,
    stride_h0_d,
    stride_h0_n,
    stride_last_s,
    stride_last_d,
    stride_last_n,
    stride_states_b,
    stride_states_d,
    stride_states_c,
    stride_states_n,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    PRODUCT_FORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # y_ptr (batch, dim, seqlen), contiguous: the output before the z gate, kept for the backward
    # (which needs it for dz) when SAVE_STATES and HAS_Z.
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)  # batch row, or packed sequence with cu_seqlens
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < dstate)[None, :]

    if IS_VARLEN:
        batch = pid_s.to(tl.int64) * 0  # packed sequences share batch row 0
        start = tl.load(cu_seqlens_ptr + pid_s).to(tl.int32)
        end = tl.load(cu_seqlens_ptr + pid_s + 1).to(tl.int32)
        chunk_base = tl.load(chunk_offsets_ptr + pid_s).to(tl.int64)
    else:
        batch = pid_s.to(tl.int64)
        start = 0
        end = seqlen
        chunk_base = 0
    # The block's channels all read one group of B and C (the launcher picks BLOCK_D so).
    group = (pid_d * BLOCK_D) // dim_per_group

    if HAS_D:
        D = tl.load(D_ptr + offs_d * stride_D, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
    if HAS_DELTA_BIAS:
        delta_bias = tl.load(delta_bias_ptr + offs_d * stride_delta_bias, mask=mask_d, other=0.0)
        delta_bias = delta_bias.to(COMPUTE_DTYPE)
    if HAS_INITIAL_STATE:
        h0_ptrs = (
            initial_state_ptr
            + pid_s.to(tl.int64) * stride_h0_s
            + offs_d[:, None] * stride_h0_d
            + offs_n[None, :] * stride_h0_n
        )
        state = tl.load(h0_ptrs, mask=mask_dn, other=0.0).to(COMPUTE_DTYPE)
    else:
        state = tl.zeros((BLOCK_D, BLOCK_N), dtype=COMPUTE_DTYPE)

    u_base = u_ptr + batch * stride_u_b + offs_d[:, None] * stride_u_d
    delta_base = delta_ptr + batch * stride_delta_b + offs_d[:, None] * stride_delta_d
    z_base = z_ptr + batch * stride_z_b + offs_d[:, None] * stride_z_d
    out_base = out_ptr + batch * stride_out_b + offs_d[:, None] * stride_out_d
    B_base = B_ptr + batch * stride_B_b + group * stride_B_g
    C_base = C_ptr + batch * stride_C_b + group * stride_C_g
    A_base = A_ptr + offs_d * stride_A_d
    states_base = (
        chunk_states_ptr
        + batch * stride_states_b
        + offs_d[:, None] * stride_states_d
        + offs_n[None, :] * stride_states_n
    )
    y_base = y_ptr + batch * dim * seqlen + offs_d[:, None].to(tl.int64) * seqlen
    is_last = (offs_l == BLOCK_L - 1)[None, :]

    # Time blocks sit at multiples of BLOCK_L of the packed row, so that the compiler can vectorize
    # their loads; positions of a block before the sequence's start are masked into identity steps.
    block_start = (start // BLOCK_L) * BLOCK_L
    num_chunks = tl.where(end > start, tl.cdiv(end - block_start, BLOCK_L), 0)
    for chunk in range(0, num_chunks):
        if SAVE_STATES:
            tl.store(states_base + (chunk_base + chunk) * stride_states_c, state, mask=mask_dn)
        t = block_start + chunk * BLOCK_L + offs_l
        mask_l = (t >= start) & (t < end)
        mask_dl = mask_d[:, None] & mask_l[None, :]
        u = tl.load(u_base + t[None, :] * stride_u_l, mask=mask_dl, other=0.0).to(COMPUTE_DTYPE)
        delta = tl.load(delta_base + t[None, :] * stride_delta_l, mask=mask_dl, other=0.0).to(COMPUTE_DTYPE)
        if HAS_DELTA_BIAS:
            delta = delta + delta_bias[:, None]
        if DELTA_SOFTPLUS:
            delta = softplus(delta)
        # delta = 0 makes a step the identity (decay 1, input 0): padded steps then carry the state
        # through unchanged, so the last column of the tile is the state after the last real step.
        delta = tl.where(mask_dl, delta, 0.0)
        delta_u = delta * u
        zero_dl = offs_d[:, None] * 0

        # One state index at a time: the (BLOCK_D, BLOCK_L) tiles stay small enough to hold in
        # registers with the time axis spread over threads, and y accumulates without reductions.
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=COMPUTE_DTYPE)
        next_state = tl.zeros((BLOCK_D, BLOCK_N), dtype=COMPUTE_DTYPE)
        # A loop, not unrolled: 16x less code to compile, and padded state indices cost nothing.
        for n in range(0, dstate):
            A_n = tl.load(A_base + n * stride_A_n, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            # B and C rows are read as (BLOCK_D, BLOCK_L) tiles (every channel row the same
            # addresses, served by the cache) so that they share the layout of u and delta: a
            # (BLOCK_L,) row would need a shared-memory layout conversion per state index.
            B_n = tl.load(
                B_base + n * stride_B_n + zero_dl + t[None, :] * stride_B_l, mask=mask_dl, other=0.0
            )
            C_n = tl.load(
                C_base + n * stride_C_n + zero_dl + t[None, :] * stride_C_l, mask=mask_dl, other=0.0
            )
            log_decay = delta * A_n[:, None]
            value = delta_u * B_n.to(COMPUTE_DTYPE)
            states = forward_states(
                log_decay, tl.exp(log_decay), value, column(state, offs_n, n), PRODUCT_FORM
            )
            y += states * C_n.to(COMPUTE_DTYPE)
            last = tl.sum(tl.where(is_last, states, 0.0), axis=1)
            next_state = tl.where(offs_n[None, :] == n, last[:, None], next_state)
        state = next_state

        if HAS_D:
            y += D[:, None] * u
        if HAS_Z:
            if SAVE_STATES:
                tl.store(y_base + t[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_dl)
            z = tl.load(z_base + t[None, :] * stride_z_l, mask=mask_dl, other=0.0).to(COMPUTE_DTYPE)
            y *= z * tl.sigmoid(z)
        tl.store(out_base + t[None, :] * stride_out_l, y.to(out_ptr.dtype.element_ty), mask=mask_dl)

    last_ptrs = (
        last_state_ptr
        + pid_s.to(tl.int64) * stride_last_s
        + offs_d[:, None] * stride_last_d
        + offs_n[None, :] * stride_last_n
    )
    tl.store(last_ptrs, state.to(last_state_ptr.dtype.element_ty), mask=mask_dn)


def _dummy(reference: torch.Tensor) -> torch.Tensor:
    # Stands in for an absent optional tensor; the kernel never reads it (its HAS_* flag is off).
    return reference


def _strides(tensor: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    return tuple(tensor.stride()) if tensor is not None else (0,) * rank


def selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    delta_softplus: bool,
    out: torch.Tensor,
    last_state: torch.Tensor,
    chunk_states: torch.Tensor | None,
    y_pregate: torch.Tensor | None,
    config: ScanConfig,
) -> None:
    """Launch the forward kernel, writing ``out``, ``last_state`` and (if given) ``chunk_states``
    and ``y_pregate`` (the output before the z gate, (batch, dim, seqlen) contiguous; only written
    with z and chunk_states, for the backward's dz).

    u, delta, z, out: (batch, dim, seqlen)   A: (dim, dstate)   B, C: (batch, ngroups, dstate, seqlen)
    D, delta_bias: (dim,)   initial_state, last_state: (num_seqs, dim, dstate) (num_seqs = batch
    without cu_seqlens)   cu_seqlens, chunk_offsets: (num_seqs + 1,), (num_seqs,)
    chunk_states: (batch, dim, num_chunks, dstate), the state before every time block of
    ``config.block_l`` steps (blocks of packed sequence i start at chunk_offsets[i]).
    """
    batch, dim, seqlen = u.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    num_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
    compute = tl.float64 if u.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(dim, config.block_d), num_seqs)
    selective_scan_fwd_kernel[grid](
        u,
        delta,
        A,
        B,
        C,
        D if D is not None else _dummy(u),
        z if z is not None else _dummy(u),
        delta_bias if delta_bias is not None else _dummy(u),
        initial_state if initial_state is not None else _dummy(u),
        cu_seqlens if cu_seqlens is not None else _dummy(u),
        chunk_offsets if chunk_offsets is not None else _dummy(u),
        out,
        last_state,
        chunk_states if chunk_states is not None else _dummy(last_state),
        y_pregate if y_pregate is not None else _dummy(out),
        dim,
        dstate,
        seqlen,
        dim // ngroups,
        *u.stride(),
        *delta.stride(),
        *_strides(z, 3),
        *out.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        D.stride(0) if D is not None else 0,
        delta_bias.stride(0) if delta_bias is not None else 0,
        *_strides(initial_state, 3),
        *last_state.stride(),
        *_strides(chunk_states, 4),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus,
        HAS_INITIAL_STATE=initial_state is not None,
        IS_VARLEN=cu_seqlens is not None,
        SAVE_STATES=chunk_states is not None,
        COMPUTE_DTYPE=compute,
        PRODUCT_FORM=config.product_form,
        BLOCK_D=config.block_d,
        BLOCK_N=config.block_n,
        BLOCK_L=config.block_l,
        num_warps=config.num_warps,
    )
