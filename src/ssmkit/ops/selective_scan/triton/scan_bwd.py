"""Fused backward kernel of the Mamba-1 selective scan.

Like the forward, one program owns ``BLOCK_D`` channels of one sequence and loops over the state
indices inside each time block, but walks the blocks last to first. Per block and state index it
recomputes the states from the state the forward saved at the block's start (storing every state
would cost ``dim * dstate * seqlen`` floats), runs the adjoint recurrence
``g_t = C_t * dy_t + exp(delta_{t+1} A) * g_{t+1}`` as a reverse associative scan, and forms every
gradient from ``h_t`` and ``g_t`` (dz from the pre-gate output the forward kept):

    dC_t  = sum_d dy_t h_t                  dB_t = sum_d g_t delta_t u_t
    du_t  = D dy_t + delta_t sum_n g_t B_t  ddelta_t = u_t sum_n g_t B_t + sum_n g_t A (h_t - delta_t B_t u_t)
    dA    = sum_t g_t (h_t - delta_t B_t u_t) delta_t

(``h_t - delta_t B_t u_t`` is ``exp(delta_t A) h_{t-1}``, which avoids shifting tiles by one step.
The subtraction cancels when the step's decay is tiny: its rounding noise, ~eps |delta_t B_t u_t|,
then swamps the true value. Where the difference lies inside that noise band it is taken as 0, which
is never further from the truth than the noise itself. On an H100 with log-decays of -120 to -5760
per step, fp32 dA was 3.3e-4 off the fp64 reference (relative) without this.)
dB and dC are shared by the channels of a group, so programs add their partial sums atomically
into fp32 buffers; dA, dD and ddelta_bias are written per sequence and summed by the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.selective_scan.triton.config import ScanConfig
from ssmkit.ops.selective_scan.triton.scan_common import adjoint_states, column, forward_states, softplus


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    cu_seqlens_ptr,
    chunk_offsets_ptr,
    chunk_states_ptr,
    y_ptr,
    dout_ptr,
    dlast_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dB_ptr,
    dC_ptr,
    dA_ptr,
    dD_ptr,
    ddelta_bias_ptr,
    dinitial_ptr,
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
    stride_dout_b,
    stride_dout_d,
    stride_dout_l,
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
    stride_states_b,
    stride_states_d,
    stride_states_c,
    stride_states_n,
    stride_dlast_s,
    stride_dlast_d,
    stride_dlast_n,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    CANCEL_TOL: tl.constexpr,
    PRODUCT_FORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Contiguous buffers: y (the forward's output before the z gate), du, ddelta, dz
    # (batch, dim, seqlen); dB, dC (batch, ngroups, dstate, seqlen) in the compute dtype, zeroed;
    # dA, dinitial (num_seqs, dim, dstate); dD, ddelta_bias (num_seqs, dim).
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < dstate)[None, :]
    ngroups = dim // dim_per_group

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
    group = (pid_d * BLOCK_D) // dim_per_group
    seq = pid_s.to(tl.int64)

    if HAS_D:
        D = tl.load(D_ptr + offs_d * stride_D, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
    if HAS_DELTA_BIAS:
        delta_bias = tl.load(delta_bias_ptr + offs_d * stride_delta_bias, mask=mask_d, other=0.0)
        delta_bias = delta_bias.to(COMPUTE_DTYPE)
    # carry[:, n]: the adjoint reaching h at the end of the current block from later steps, i.e.
    # exp(delta_{t+1} A) g_{t+1}; at the end of the sequence it is the gradient of last_state.
    if HAS_DLAST:
        dlast_ptrs = (
            dlast_ptr
            + seq * stride_dlast_s
            + offs_d[:, None] * stride_dlast_d
            + offs_n[None, :] * stride_dlast_n
        )
        carry = tl.load(dlast_ptrs, mask=mask_dn, other=0.0).to(COMPUTE_DTYPE)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=COMPUTE_DTYPE)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=COMPUTE_DTYPE)
    dD_acc = tl.zeros((BLOCK_D,), dtype=COMPUTE_DTYPE)
    ddelta_bias_acc = tl.zeros((BLOCK_D,), dtype=COMPUTE_DTYPE)

    row = batch * dim * seqlen + offs_d[:, None].to(tl.int64) * seqlen  # contiguous (b, d, l) rows
    group_base = (batch * ngroups + group) * dstate * seqlen  # contiguous dB/dC rows of the group
    u_base = u_ptr + batch * stride_u_b + offs_d[:, None] * stride_u_d
    delta_base = delta_ptr + batch * stride_delta_b + offs_d[:, None] * stride_delta_d
    z_base = z_ptr + batch * stride_z_b + offs_d[:, None] * stride_z_d
    dout_base = dout_ptr + batch * stride_dout_b + offs_d[:, None] * stride_dout_d
    B_base = B_ptr + batch * stride_B_b + group * stride_B_g
    C_base = C_ptr + batch * stride_C_b + group * stride_C_g
    A_base = A_ptr + offs_d * stride_A_d
    states_base = (
        chunk_states_ptr
        + batch * stride_states_b
        + offs_d[:, None] * stride_states_d
        + offs_n[None, :] * stride_states_n
    )
    is_first = (offs_l == 0)[None, :]

    # Time blocks sit at multiples of BLOCK_L of the packed row, so that the compiler can vectorize
    # their loads; positions of a block before the sequence's start are masked into identity steps.
    block_start = (start // BLOCK_L) * BLOCK_L
    num_chunks = tl.where(end > start, tl.cdiv(end - block_start, BLOCK_L), 0)
    for step in range(0, num_chunks):
        chunk = num_chunks - 1 - step
        t = block_start + chunk * BLOCK_L + offs_l
        mask_l = (t >= start) & (t < end)
        mask_dl = mask_d[:, None] & mask_l[None, :]
        u = tl.load(u_base + t[None, :] * stride_u_l, mask=mask_dl, other=0.0).to(COMPUTE_DTYPE)
        delta_raw = tl.load(delta_base + t[None, :] * stride_delta_l, mask=mask_dl, other=0.0)
        delta_raw = delta_raw.to(COMPUTE_DTYPE)
        dout = tl.load(dout_base + t[None, :] * stride_dout_l, mask=mask_dl, other=0.0).to(COMPUTE_DTYPE)
        state0 = tl.load(states_base + (chunk_base + chunk) * stride_states_c, mask=mask_dn, other=0.0)
        state0 = state0.to(COMPUTE_DTYPE)
        if HAS_DELTA_BIAS:
            delta_raw = delta_raw + delta_bias[:, None]
        if DELTA_SOFTPLUS:
            delta = softplus(delta_raw)
        else:
            delta = delta_raw
        delta = tl.where(mask_dl, delta, 0.0)  # padded steps become identities, as in the forward
        delta_u = delta * u
        zero_dl = offs_d[:, None] * 0

        if HAS_Z:
            z = tl.load(z_base + t[None, :] * stride_z_l, mask=mask_dl, other=0.0).to(COMPUTE_DTYPE)
            y = tl.load(y_ptr + row + t[None, :], mask=mask_dl, other=0.0).to(COMPUTE_DTYPE)
            gate_sigmoid = tl.sigmoid(z)
            dz = dout * y * gate_sigmoid * (1.0 + z * (1.0 - gate_sigmoid))
            tl.store(dz_ptr + row + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask_dl)
            dy = dout * z * gate_sigmoid
        else:
            dy = dout
        if HAS_D:
            du = D[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        else:
            du = tl.zeros((BLOCK_D, BLOCK_L), dtype=COMPUTE_DTYPE)
        ddelta = tl.zeros((BLOCK_D, BLOCK_L), dtype=COMPUTE_DTYPE)

        next_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=COMPUTE_DTYPE)
        # A loop, not unrolled: 16x less code to compile, and padded state indices cost nothing.
        for n in range(0, dstate):
            A_n = tl.load(A_base + n * stride_A_n, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            # (BLOCK_D, BLOCK_L) tiles of repeated rows: the layout of u, no conversion (see forward).
            B_n = tl.load(
                B_base + n * stride_B_n + zero_dl + t[None, :] * stride_B_l, mask=mask_dl, other=0.0
            )
            C_n = tl.load(
                C_base + n * stride_C_n + zero_dl + t[None, :] * stride_C_l, mask=mask_dl, other=0.0
            )
            B_n = B_n.to(COMPUTE_DTYPE)
            C_n = C_n.to(COMPUTE_DTYPE)
            # Recompute the block's states from the saved one.
            log_decay = delta * A_n[:, None]
            decay = tl.exp(log_decay)
            value = delta_u * B_n
            states = forward_states(log_decay, decay, value, column(state0, offs_n, n), PRODUCT_FORM)
            # Adjoint states g_t by a reverse scan, plus what flows in from later blocks.
            adjoint = adjoint_states(log_decay, decay, C_n * dy, column(carry, offs_n, n), PRODUCT_FORM)
            flow_back = tl.sum(tl.where(is_first, decay * adjoint, 0.0), axis=1)
            next_carry = tl.where(offs_n[None, :] == n, flow_back[:, None], next_carry)

            adjoint_B = adjoint * B_n
            decayed_prev = states - value  # exp(delta_t A) h_{t-1}; 0 where lost in rounding
            noise = CANCEL_TOL * tl.maximum(tl.abs(states), tl.abs(value))
            decayed_prev = tl.where(tl.abs(decayed_prev) <= noise, 0.0, decayed_prev)
            adjoint_decayed = adjoint * decayed_prev  # g_t exp(delta_t A) h_{t-1}
            ddelta += adjoint_B * u + adjoint_decayed * A_n[:, None]
            du += adjoint_B * delta
            dA_n = tl.sum(adjoint_decayed * delta, axis=1)
            dA_acc += tl.where(offs_n[None, :] == n, dA_n[:, None], 0.0)
            # This program's channels are summed here; other programs of the group add theirs.
            dB_n = tl.sum(adjoint * delta_u, axis=0)
            dC_n = tl.sum(states * dy, axis=0)
            # Relaxed: the sums need no ordering with other memory traffic (the default acq_rel adds
            # a fence per atomic).
            tl.atomic_add(dB_ptr + group_base + n * seqlen + t, dB_n, mask=mask_l, sem="relaxed")
            tl.atomic_add(dC_ptr + group_base + n * seqlen + t, dC_n, mask=mask_l, sem="relaxed")
        carry = next_carry

        if DELTA_SOFTPLUS:
            ddelta = ddelta * tl.sigmoid(delta_raw)
        ddelta = tl.where(mask_dl, ddelta, 0.0)
        ddelta_bias_acc += tl.sum(ddelta, axis=1)
        tl.store(du_ptr + row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=mask_dl)
        tl.store(ddelta_ptr + row + t[None, :], ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_dl)

    dn_offsets = seq * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
    tl.store(dA_ptr + dn_offsets, dA_acc, mask=mask_dn)
    if HAS_INITIAL_STATE:
        tl.store(dinitial_ptr + dn_offsets, carry, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + seq * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_ptr + seq * dim + offs_d, ddelta_bias_acc, mask=mask_d)


def _strides(tensor: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    return tuple(tensor.stride()) if tensor is not None else (0,) * rank


def selective_scan_bwd(
    dout: torch.Tensor,
    dlast_state: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    has_initial_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    chunk_states: torch.Tensor,
    y_pregate: torch.Tensor | None,
    delta_softplus: bool,
    config: ScanConfig,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel and reduce the per-sequence partial sums.

    dout, u, delta, z: (batch, dim, seqlen)   dlast_state: (num_seqs, dim, dstate) or None
    A: (dim, dstate)   B, C: (batch, ngroups, dstate, seqlen)   D, delta_bias: (dim,)
    chunk_states: (batch, dim, num_chunks, dstate) saved by the forward with ``config.block_l``.
    y_pregate: (batch, dim, seqlen) contiguous, the forward's output before the z gate (with z).

    Returns du, ddelta, dz (dtype of u/delta/z; dz empty without z), dA (compute dtype),
    dB, dC (fp32, or fp64 for fp64 inputs), dD, ddelta_bias (compute dtype; empty when absent),
    dinitial_state (num_seqs, dim, dstate) in the compute dtype (empty without an initial state).
    """
    batch, dim, seqlen = u.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    num_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    compute = tl.float64 if u.dtype == torch.float64 else tl.float32
    # Absent gradients are distinct empty tensors: a custom op's outputs may not alias each other.
    empty = lambda: u.new_empty(0, dtype=compute_dtype)

    du = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    ddelta = torch.empty((batch, dim, seqlen), dtype=delta.dtype, device=u.device)
    dz = torch.empty((batch, dim, seqlen), dtype=z.dtype, device=u.device) if z is not None else empty()
    dB = torch.zeros((batch, ngroups, dstate, seqlen), dtype=compute_dtype, device=u.device)
    dC = torch.zeros((batch, ngroups, dstate, seqlen), dtype=compute_dtype, device=u.device)
    dA = torch.empty((num_seqs, dim, dstate), dtype=compute_dtype, device=u.device)
    dD = torch.empty((num_seqs, dim), dtype=compute_dtype, device=u.device) if D is not None else empty()
    ddelta_bias = (
        torch.empty((num_seqs, dim), dtype=compute_dtype, device=u.device)
        if delta_bias is not None
        else empty()
    )
    dinitial = (
        torch.empty((num_seqs, dim, dstate), dtype=compute_dtype, device=u.device)
        if has_initial_state
        else empty()
    )

    grid = (triton.cdiv(dim, config.block_d), num_seqs)
    selective_scan_bwd_kernel[grid](
        u,
        delta,
        A,
        B,
        C,
        D if D is not None else u,
        z if z is not None else u,
        delta_bias if delta_bias is not None else u,
        cu_seqlens if cu_seqlens is not None else u,
        chunk_offsets if chunk_offsets is not None else u,
        chunk_states,
        y_pregate if y_pregate is not None else u,
        dout,
        dlast_state if dlast_state is not None else u,
        du,
        ddelta,
        dz if z is not None else du,
        dB,
        dC,
        dA,
        dD if D is not None else dA,
        ddelta_bias if delta_bias is not None else dA,
        dinitial if has_initial_state else dA,
        dim,
        dstate,
        seqlen,
        dim // ngroups,
        *u.stride(),
        *delta.stride(),
        *_strides(z, 3),
        *dout.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        D.stride(0) if D is not None else 0,
        delta_bias.stride(0) if delta_bias is not None else 0,
        *chunk_states.stride(),
        *_strides(dlast_state, 3),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus,
        HAS_INITIAL_STATE=has_initial_state,
        HAS_DLAST=dlast_state is not None,
        IS_VARLEN=cu_seqlens is not None,
        COMPUTE_DTYPE=compute,
        # A few ulps of the compute dtype: the rounding noise of a state after the scan.
        CANCEL_TOL=8 * torch.finfo(compute_dtype).eps,
        PRODUCT_FORM=config.product_form,
        BLOCK_D=config.block_d,
        BLOCK_N=config.block_n,
        BLOCK_L=config.block_l,
        num_warps=config.num_warps,
    )
    dA = dA.sum(0)
    if D is not None:
        dD = dD.sum(0)
    if delta_bias is not None:
        ddelta_bias = ddelta_bias.sum(0)
    return du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinitial
