"""Backward kernel of the stable state scan ("euler" discretisation).

Same programs as the forward (``BLOCK_D`` channels of one batch row). Time is walked in reverse,
one ``CHUNK``-step segment at a time: the segment's states are recomputed forward from the
checkpoint the forward stored and kept, after the reset, in a per-program scratch buffer
(``CHUNK`` tiles of (BLOCK_D, BLOCK_N), small enough to stay in cache); then the steps are undone
in reverse, each recomputing its LayerNorm statistics from the kept previous state, with the
adjoint of the state ``dh`` in registers. Per step, with ``g = dt * dz``::

    dh      += dy C                          dC_t += sum_d dy h
    dzhat    = dh * weight                   dz    = rstd (dzhat - mean(dzhat) - zhat mean(dzhat zhat))
    ddt      = sum_n dz (A hp + x B)         dx    = dt sum_n dz B          dB_t += sum_d dz dt x
    dA      += g^T hp                        dh_prev = keep (dz + g A)
    dweight += sum_d dh zhat                 dbias += sum_d dh

dx and ddt belong to one program and are written directly. dB, dC (shared by every channel of a
row), dA, dweight and dbias (shared by everything) are written as one partial per channel block
(dA, dweight, dbias: per program) and summed by the launcher: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.stable_scan.triton.scan_common import keep_state, matmul, update


@triton.jit
def stable_scan_bwd_kernel(
    dy_ptr,
    dfinal_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    weight_ptr,
    bias_ptr,
    eps_ptr,
    seq_idx_ptr,
    checkpoints_ptr,
    scratch_ptr,
    dx_ptr,
    ddt_ptr,
    dB_ptr,
    dC_ptr,
    dA_ptr,
    dweight_ptr,
    dbias_ptr,
    dinitial_ptr,
    seqlen,
    d_inner,
    d_state,
    stride_dy_b,
    stride_dy_l,
    stride_dy_d,
    stride_dfinal_b,
    stride_dfinal_d,
    stride_dfinal_n,
    stride_x_b,
    stride_x_l,
    stride_x_d,
    stride_dt_b,
    stride_dt_l,
    stride_dt_d,
    stride_A_i,
    stride_A_j,
    stride_B_b,
    stride_B_l,
    stride_B_n,
    stride_C_b,
    stride_C_l,
    stride_C_n,
    stride_weight,
    stride_bias,
    stride_seq_b,
    stride_seq_l,
    stride_ckpt_b,
    stride_ckpt_c,
    stride_ckpt_d,
    stride_ckpt_n,
    HAS_DFINAL: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    USE_DOT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Contiguous buffers written here: dx, ddt (batch, seqlen, d_inner); dB, dC (num_d_blocks,
    # batch, seqlen, d_state); dA (programs, d_state, d_state); dweight, dbias (programs,
    # d_state); dinitial (batch, d_inner, d_state); scratch (programs, CHUNK, BLOCK_D, BLOCK_N).
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    batch = tl.num_programs(1)
    program = pid_b * tl.num_programs(0) + pid_d
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    mask_nn = mask_n[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + offs_n[:, None] * stride_A_i + offs_n[None, :] * stride_A_j, mask=mask_nn, other=0.0)
    A = A.to(COMPUTE_DTYPE)
    AT = tl.trans(A)
    weight = tl.load(weight_ptr + offs_n * stride_weight, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
    bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
    eps = tl.load(eps_ptr).to(COMPUTE_DTYPE)
    if HAS_DFINAL:
        dfinal_ptrs = (
            dfinal_ptr
            + pid_b * stride_dfinal_b
            + offs_d[:, None] * stride_dfinal_d
            + offs_n[None, :] * stride_dfinal_n
        )
        dh = tl.load(dfinal_ptrs, mask=mask_dn, other=0.0).to(COMPUTE_DTYPE)
    else:
        dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=COMPUTE_DTYPE)
    dA = tl.zeros((BLOCK_N, BLOCK_N), dtype=COMPUTE_DTYPE)
    dweight = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
    dbias = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)

    x_base = x_ptr + pid_b * stride_x_b + offs_d * stride_x_d
    dt_base = dt_ptr + pid_b * stride_dt_b + offs_d * stride_dt_d
    dy_base = dy_ptr + pid_b * stride_dy_b + offs_d * stride_dy_d
    B_base = B_ptr + pid_b * stride_B_b + offs_n * stride_B_n
    C_base = C_ptr + pid_b * stride_C_b + offs_n * stride_C_n
    seq_base = seq_idx_ptr + pid_b * stride_seq_b
    ckpt_base = (
        checkpoints_ptr
        + pid_b * stride_ckpt_b
        + offs_d[:, None] * stride_ckpt_d
        + offs_n[None, :] * stride_ckpt_n
    )
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    scratch_base = scratch_ptr + program * (CHUNK * BLOCK_D * BLOCK_N) + tile
    row_base = pid_b * seqlen * d_inner + offs_d  # dx, ddt
    state_base = (pid_d * batch + pid_b) * seqlen * d_state + offs_n  # dB, dC partials

    num_chunks = tl.cdiv(seqlen, CHUNK)
    for reversed_chunk in range(0, num_chunks):
        chunk = num_chunks - 1 - reversed_chunk
        start = chunk * CHUNK
        steps = tl.minimum(seqlen - start, CHUNK)
        # Recompute the segment's states; keep each step's previous state (after the reset).
        h = tl.load(ckpt_base + chunk * stride_ckpt_c, mask=mask_dn, other=0.0).to(COMPUTE_DTYPE)
        tl.debug_barrier()  # the previous segment's reads of the scratch are done
        for j in range(0, steps):
            t = start + j
            dt = tl.load(dt_base + t * stride_dt_l, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            x = tl.load(x_base + t * stride_x_l, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            B = tl.load(B_base + t * stride_B_l, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
            keep = keep_state(seq_base, stride_seq_l, t, HAS_SEQ_IDX)
            hp = tl.where(keep, h, 0.0)
            tl.store(scratch_base + j * (BLOCK_D * BLOCK_N), hp)
            h, _, _ = update(hp, dt, x, B, AT, weight, bias, eps, mask_n, d_state, USE_DOT)
        tl.debug_barrier()  # the scratch is written
        # Undo the segment's steps in reverse.
        for reversed_j in range(0, steps):
            j = steps - 1 - reversed_j
            t = start + j
            dt = tl.load(dt_base + t * stride_dt_l, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            x = tl.load(x_base + t * stride_x_l, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            dy = tl.load(dy_base + t * stride_dy_l, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            B = tl.load(B_base + t * stride_B_l, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
            C = tl.load(C_base + t * stride_C_l, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
            hp = tl.load(scratch_base + j * (BLOCK_D * BLOCK_N))
            h, zhat, rstd = update(hp, dt, x, B, AT, weight, bias, eps, mask_n, d_state, USE_DOT)

            dy = tl.where(mask_d, dy, 0.0)
            tl.store(dC_ptr + state_base + t * d_state, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
            dh += dy[:, None] * C[None, :]
            dweight += tl.sum(dh * zhat, axis=0)
            dbias += tl.sum(dh, axis=0)
            dzhat = dh * weight[None, :]
            mean_dzhat = tl.sum(dzhat, axis=1) / d_state
            mean_dzhat_zhat = tl.sum(dzhat * zhat, axis=1) / d_state
            dz = rstd[:, None] * (dzhat - mean_dzhat[:, None] - zhat * mean_dzhat_zhat[:, None])
            dz = tl.where(mask_dn, dz, 0.0)

            Ahp = matmul(hp, AT, USE_DOT)
            ddt = tl.sum(dz * (Ahp + x[:, None] * B[None, :]), axis=1)
            dzB = tl.sum(dz * B[None, :], axis=1)
            tl.store(ddt_ptr + row_base + t * d_inner, ddt, mask=mask_d)
            tl.store(dx_ptr + row_base + t * d_inner, dt * dzB, mask=mask_d)
            tl.store(dB_ptr + state_base + t * d_state, tl.sum(dz * (dt * x)[:, None], axis=0), mask=mask_n)
            g = dz * dt[:, None]
            dA += matmul(tl.trans(g), hp, USE_DOT)
            dhp = dz + matmul(g, A, USE_DOT)
            keep = keep_state(seq_base, stride_seq_l, t, HAS_SEQ_IDX)
            dh = tl.where(keep, dhp, 0.0)

    if HAS_INITIAL_STATE:
        dinitial_ptrs = dinitial_ptr + pid_b * d_inner * d_state + offs_d[:, None] * d_state + offs_n[None, :]
        tl.store(dinitial_ptrs, dh, mask=mask_dn)
    dA_ptrs = dA_ptr + program * d_state * d_state + offs_n[:, None] * d_state + offs_n[None, :]
    tl.store(dA_ptrs, dA, mask=mask_nn)
    tl.store(dweight_ptr + program * d_state + offs_n, dweight, mask=mask_n)
    tl.store(dbias_ptr + program * d_state + offs_n, dbias, mask=mask_n)


def _strides(tensor: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    return tuple(tensor.stride()) if tensor is not None else (0,) * rank


def stable_scan_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: torch.Tensor,
    seq_idx: torch.Tensor | None,
    checkpoints: torch.Tensor,
    has_initial_state: bool,
    chunk: int,
    block_d: int,
    num_warps: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel. Shapes as in ``stable_scan_fwd``; dy: (batch, seqlen, d_inner),
    dfinal: (batch, d_inner, d_state) or None. Returns dx, ddt, dA, dB, dC, dweight, dbias (in the
    compute dtype) and dinitial (empty without an initial state)."""
    batch, seqlen, d_inner = x.shape
    d_state = A.shape[0]
    compute_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    compute = tl.float64 if compute_torch == torch.float64 else tl.float32
    block_n = max(16, triton.next_power_of_2(d_state))
    num_d_blocks = triton.cdiv(d_inner, block_d)
    programs = num_d_blocks * batch
    new = dict(dtype=compute_torch, device=x.device)
    dx = torch.empty(batch, seqlen, d_inner, **new)
    ddt = torch.empty(batch, seqlen, d_inner, **new)
    dB = torch.empty(num_d_blocks, batch, seqlen, d_state, **new)
    dC = torch.empty(num_d_blocks, batch, seqlen, d_state, **new)
    dA = torch.empty(programs, d_state, d_state, **new)
    dweight = torch.empty(programs, d_state, **new)
    dbias = torch.empty(programs, d_state, **new)
    dinitial = torch.empty((batch, d_inner, d_state) if has_initial_state else (0,), **new)
    scratch = torch.empty(programs, chunk, block_d, block_n, **new)
    stable_scan_bwd_kernel[(num_d_blocks, batch)](
        dy,
        dfinal if dfinal is not None else dy,
        x,
        dt,
        A,
        B,
        C,
        weight,
        bias,
        eps,
        seq_idx if seq_idx is not None else x,
        checkpoints,
        scratch,
        dx,
        ddt,
        dB,
        dC,
        dA,
        dweight,
        dbias,
        dinitial,
        seqlen,
        d_inner,
        d_state,
        *dy.stride(),
        *_strides(dfinal, 3),
        *x.stride(),
        *dt.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        weight.stride(0),
        bias.stride(0),
        *_strides(seq_idx, 2),
        *checkpoints.stride(),
        HAS_DFINAL=dfinal is not None,
        HAS_INITIAL_STATE=has_initial_state,
        HAS_SEQ_IDX=seq_idx is not None,
        USE_DOT=compute == tl.float32,
        COMPUTE_DTYPE=compute,
        CHUNK=chunk,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dx, ddt, dA.sum(0), dB.sum(0), dC.sum(0), dweight.sum(0), dbias.sum(0), dinitial
