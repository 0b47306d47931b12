"""Forward kernel of the stable state scan ("euler" discretisation).

One program owns ``BLOCK_D`` channels of one batch row and walks the sequence step by step with
the (BLOCK_D, BLOCK_N) state tile in registers: per step it loads dt and x (BLOCK_D,), B and C
(BLOCK_N,), computes ``A h`` for all its channels as one small matrix product, the LayerNorm over
the state axis and ``y = C . h``. The LayerNorm makes the recurrence nonlinear, so time cannot be
split into parallel blocks; the parallelism is over batch rows and channel blocks. For the
backward the state before every ``CHUNK``-step segment is stored (``SAVE_CHECKPOINTS``), a
``1/CHUNK`` fraction of the state history.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.stable_scan.triton.scan_common import keep_state, update


@triton.jit
def stable_scan_fwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    weight_ptr,
    bias_ptr,
    eps_ptr,
    initial_state_ptr,
    seq_idx_ptr,
    y_ptr,
    final_state_ptr,
    checkpoints_ptr,
    seqlen,
    d_inner,
    d_state,
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
    stride_h0_b,
    stride_h0_d,
    stride_h0_n,
    stride_seq_b,
    stride_seq_l,
    stride_y_b,
    stride_y_l,
    stride_y_d,
    stride_final_b,
    stride_final_d,
    stride_final_n,
    stride_ckpt_b,
    stride_ckpt_c,
    stride_ckpt_d,
    stride_ckpt_n,
    HAS_INITIAL_STATE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr,
    USE_DOT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    mask_nn = mask_n[:, None] & mask_n[None, :]

    # AT[j, i] = A[i, j], so that (A h) for a row-major tile of states is h @ AT.
    AT = tl.load(A_ptr + offs_n[None, :] * stride_A_i + offs_n[:, None] * stride_A_j, mask=mask_nn, other=0.0)
    AT = AT.to(COMPUTE_DTYPE)
    weight = tl.load(weight_ptr + offs_n * stride_weight, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
    bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
    eps = tl.load(eps_ptr).to(COMPUTE_DTYPE)
    if HAS_INITIAL_STATE:
        h0_ptrs = (
            initial_state_ptr
            + pid_b * stride_h0_b
            + offs_d[:, None] * stride_h0_d
            + offs_n[None, :] * stride_h0_n
        )
        h = tl.load(h0_ptrs, mask=mask_dn, other=0.0).to(COMPUTE_DTYPE)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=COMPUTE_DTYPE)

    x_base = x_ptr + pid_b * stride_x_b + offs_d * stride_x_d
    dt_base = dt_ptr + pid_b * stride_dt_b + offs_d * stride_dt_d
    B_base = B_ptr + pid_b * stride_B_b + offs_n * stride_B_n
    C_base = C_ptr + pid_b * stride_C_b + offs_n * stride_C_n
    y_base = y_ptr + pid_b * stride_y_b + offs_d * stride_y_d
    seq_base = seq_idx_ptr + pid_b * stride_seq_b
    ckpt_base = (
        checkpoints_ptr
        + pid_b * stride_ckpt_b
        + offs_d[:, None] * stride_ckpt_d
        + offs_n[None, :] * stride_ckpt_n
    )

    num_chunks = tl.cdiv(seqlen, CHUNK)
    for chunk in range(0, num_chunks):
        if SAVE_CHECKPOINTS:
            tl.store(ckpt_base + chunk * stride_ckpt_c, h, mask=mask_dn)
        start = chunk * CHUNK
        steps = tl.minimum(seqlen - start, CHUNK)
        for j in range(0, steps):
            t = start + j
            dt = tl.load(dt_base + t * stride_dt_l, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            x = tl.load(x_base + t * stride_x_l, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
            B = tl.load(B_base + t * stride_B_l, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
            C = tl.load(C_base + t * stride_C_l, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
            keep = keep_state(seq_base, stride_seq_l, t, HAS_SEQ_IDX)
            hp = tl.where(keep, h, 0.0)
            h, _, _ = update(hp, dt, x, B, AT, weight, bias, eps, mask_n, d_state, USE_DOT)
            y = tl.sum(h * C[None, :], axis=1)
            tl.store(y_base + t * stride_y_l, y.to(y_ptr.dtype.element_ty), mask=mask_d)

    final_ptrs = (
        final_state_ptr
        + pid_b * stride_final_b
        + offs_d[:, None] * stride_final_d
        + offs_n[None, :] * stride_final_n
    )
    tl.store(final_ptrs, h.to(final_state_ptr.dtype.element_ty), mask=mask_dn)


def _strides(tensor: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    return tuple(tensor.stride()) if tensor is not None else (0,) * rank


def stable_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: torch.Tensor,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    y: torch.Tensor,
    final_state: torch.Tensor,
    checkpoints: torch.Tensor | None,
    chunk: int,
    block_d: int,
    num_warps: int,
) -> None:
    """Launch the forward kernel, writing ``y``, ``final_state`` and (if given) ``checkpoints``.

    x, dt, y: (batch, seqlen, d_inner)   A: (d_state, d_state)   B, C: (batch, seqlen, d_state)
    weight, bias: (d_state,)   eps: (1,) in the compute dtype   initial_state, final_state:
    (batch, d_inner, d_state)   seq_idx: (batch, seqlen) int   checkpoints: (batch,
    cdiv(seqlen, chunk), d_inner, d_state), the state before every segment of ``chunk`` steps.
    """
    batch, seqlen, d_inner = x.shape
    d_state = A.shape[0]
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(d_inner, block_d), batch)
    stable_scan_fwd_kernel[grid](
        x,
        dt,
        A,
        B,
        C,
        weight,
        bias,
        eps,
        initial_state if initial_state is not None else x,
        seq_idx if seq_idx is not None else x,
        y,
        final_state,
        checkpoints if checkpoints is not None else final_state,
        seqlen,
        d_inner,
        d_state,
        *x.stride(),
        *dt.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        weight.stride(0),
        bias.stride(0),
        *_strides(initial_state, 3),
        *_strides(seq_idx, 2),
        *y.stride(),
        *final_state.stride(),
        *_strides(checkpoints, 4),
        HAS_INITIAL_STATE=initial_state is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        SAVE_CHECKPOINTS=checkpoints is not None,
        USE_DOT=compute == tl.float32,
        COMPUTE_DTYPE=compute,
        CHUNK=chunk,
        BLOCK_D=block_d,
        BLOCK_N=max(16, triton.next_power_of_2(d_state)),
        num_warps=num_warps,
    )
