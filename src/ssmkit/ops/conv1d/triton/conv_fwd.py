"""Forward kernel of the causal depthwise conv1d, and the window loader the backward shares.

Conventions: ``padded`` is the input row with its history in front, [initial_states, x], so tap k of
output position t reads x at position t - (width - 1) + k, which is the initial state's column
t + k when negative. With ``seq_idx``, a tap that lands in another sequence than its output reads
zero; the history counts as part of the row's first sequence (seq_idx[:, 0]).

One program computes a (BLOCK_D channels, BLOCK_L positions) tile. The ``width`` shifted loads of x
overlap almost entirely and hit the cache, so HBM sees x read once and out written once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def load_padded(
    x_row_ptr,
    init_row_ptr,
    seq_row_ptr,
    offs_d,
    mask_d,
    pos,
    target_seq,
    seqlen,
    stride_x_d,
    stride_x_l,
    stride_init_d,
    stride_init_k,
    stride_seq_l,
    WIDTH: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Inputs at positions ``pos`` (any 1-D block; may be negative or past the end) for channels
    ``offs_d``, as (BLOCK_D, len(pos)) in COMPUTE_DTYPE: x where 0 <= pos < seqlen, the initial state
    for -(width - 1) <= pos < 0, zero elsewhere. With HAS_SEQ_IDX, columns whose sequence differs
    from ``target_seq`` (same shape as pos) are zeroed too."""
    in_x = (pos >= 0) & (pos < seqlen)
    values = tl.load(
        x_row_ptr + offs_d[:, None] * stride_x_d + pos[None, :] * stride_x_l,
        mask=mask_d[:, None] & in_x[None, :],
        other=0.0,
    ).to(COMPUTE_DTYPE)
    if HAS_INIT:
        in_history = (pos < 0) & (pos > -WIDTH)
        values += tl.load(
            init_row_ptr + offs_d[:, None] * stride_init_d + (pos + WIDTH - 1)[None, :] * stride_init_k,
            mask=mask_d[:, None] & in_history[None, :],
            other=0.0,
        ).to(COMPUTE_DTYPE)
    if HAS_SEQ_IDX:
        # The history shares the sequence id of position 0; positions past the end match nothing.
        source_seq = tl.load(seq_row_ptr + tl.maximum(pos, 0) * stride_seq_l, mask=pos < seqlen, other=-1)
        values = tl.where((source_seq == target_seq)[None, :], values, 0.0)
    return values


@triton.jit
def conv_pre_activation(
    x_row_ptr,
    init_row_ptr,
    seq_row_ptr,
    w_ptr,
    bias_ptr,
    offs_d,
    mask_d,
    pos,
    target_seq,
    seqlen,
    stride_x_d,
    stride_x_l,
    stride_init_d,
    stride_init_k,
    stride_seq_l,
    stride_w_d,
    stride_w_k,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """bias + sum_k weight[:, k] * input[pos - (width - 1) + k], as (BLOCK_D, len(pos))."""
    if HAS_BIAS:
        acc = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)[:, None] + tl.zeros(
            [1, pos.shape[0]], dtype=COMPUTE_DTYPE
        )
    else:
        acc = tl.zeros([offs_d.shape[0], pos.shape[0]], dtype=COMPUTE_DTYPE)
    for k in tl.static_range(WIDTH):
        w_k = tl.load(w_ptr + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)
        acc += w_k[:, None] * load_padded(
            x_row_ptr,
            init_row_ptr,
            seq_row_ptr,
            offs_d,
            mask_d,
            pos - (WIDTH - 1 - k),
            target_seq,
            seqlen,
            stride_x_d,
            stride_x_l,
            stride_init_d,
            stride_init_k,
            stride_seq_l,
            WIDTH,
            HAS_INIT,
            HAS_SEQ_IDX,
            COMPUTE_DTYPE,
        )
    return acc


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    seq_idx_ptr,
    init_ptr,
    out_ptr,
    final_ptr,
    dim,
    seqlen,
    stride_x_b,
    stride_x_d,
    stride_x_l,
    stride_w_d,
    stride_w_k,
    stride_seq_b,
    stride_seq_l,
    stride_init_b,
    stride_init_d,
    stride_init_k,
    stride_out_b,
    stride_out_d,
    stride_out_l,
    stride_final_b,
    stride_final_d,
    stride_final_k,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    HAS_INIT: tl.constexpr,
    SILU: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_HISTORY: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    batch_row = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    # int64 positions: position * stride exceeds 2**31 for long channel-last rows (seqlen * dim).
    offs_l = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    mask_d = offs_d < dim
    mask_l = offs_l < seqlen
    x_row_ptr = x_ptr + batch_row * stride_x_b
    init_row_ptr = init_ptr + batch_row * stride_init_b
    seq_row_ptr = seq_idx_ptr + batch_row * stride_seq_b

    target_seq = 0
    if HAS_SEQ_IDX:
        target_seq = tl.load(seq_row_ptr + offs_l * stride_seq_l, mask=mask_l, other=-2)
    acc = conv_pre_activation(
        x_row_ptr,
        init_row_ptr,
        seq_row_ptr,
        w_ptr,
        bias_ptr,
        offs_d,
        mask_d,
        offs_l,
        target_seq,
        seqlen,
        stride_x_d,
        stride_x_l,
        stride_init_d,
        stride_init_k,
        stride_seq_l,
        stride_w_d,
        stride_w_k,
        WIDTH,
        HAS_BIAS,
        HAS_INIT,
        HAS_SEQ_IDX,
        COMPUTE_DTYPE,
    )
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(
        out_ptr + batch_row * stride_out_b + offs_d[:, None] * stride_out_d + offs_l[None, :] * stride_out_l,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_d[:, None] & mask_l[None, :],
    )

    if pid_l == tl.num_programs(0) - 1:
        # final_states[..., j] = padded[..., seqlen + j]: the input at position seqlen - (width - 1) + j,
        # kept only when it belongs to the row's last sequence.
        offs_j = tl.arange(0, BLOCK_HISTORY)
        last_seq = 0
        if HAS_SEQ_IDX:
            last_seq = tl.load(seq_row_ptr + (seqlen - 1) * stride_seq_l) + tl.zeros(
                [BLOCK_HISTORY], dtype=tl.int64
            )
        final = load_padded(
            x_row_ptr,
            init_row_ptr,
            seq_row_ptr,
            offs_d,
            mask_d,
            seqlen - (WIDTH - 1) + offs_j,
            last_seq,
            seqlen,
            stride_x_d,
            stride_x_l,
            stride_init_d,
            stride_init_k,
            stride_seq_l,
            WIDTH,
            HAS_INIT,
            HAS_SEQ_IDX,
            COMPUTE_DTYPE,
        )
        tl.store(
            final_ptr
            + batch_row * stride_final_b
            + offs_d[:, None] * stride_final_d
            + offs_j[None, :] * stride_final_k,
            final.to(final_ptr.dtype.element_ty),
            mask=mask_d[:, None] & (offs_j < WIDTH - 1)[None, :],
        )


def or_placeholder(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    # Absent optional tensors are replaced by a placeholder: the kernels never dereference them
    # (their HAS_* flags are off) but do compute row offsets, which a None pointer does not allow.
    return placeholder if t is None else t


def compute_dtype(*tensors: torch.Tensor | None) -> tl.dtype:
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


@functools.cache
def tile_config(is_cuda: bool, channels_last: bool, dim: int, seqlen: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, num_warps). The tile is long along the contiguous axis of x so loads
    coalesce: along seqlen for (batch, dim, seqlen)-contiguous x, along dim for channel-last x
    (the transposed view of a (batch, seqlen, dim) activation, Mamba's usual layout)."""
    if not is_cuda:
        # The CPU interpreter pays per program: few, large tiles.
        return min(64, triton.next_power_of_2(dim)), min(64, triton.next_power_of_2(max(seqlen, 1))), 4
    if channels_last:
        block_d, block_l = (
            min(128, triton.next_power_of_2(dim)),
            min(32, triton.next_power_of_2(max(seqlen, 1))),
        )
    else:
        block_d, block_l = (
            min(16, triton.next_power_of_2(dim)),
            min(256, triton.next_power_of_2(max(seqlen, 1))),
        )
    return block_d, block_l, 4


def causal_conv1d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    silu: bool,
    out: torch.Tensor,
    final_states: torch.Tensor,
) -> None:
    """Launch the forward kernel; writes ``out`` and ``final_states``.

    x, out: (batch, dim, seqlen) any strides   weight: (dim, width)   bias: (dim,)
    seq_idx: (batch, seqlen) int   initial_states, final_states: (batch, dim, width - 1)
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    block_d, block_l, num_warps = tile_config(
        x.device.type == "cuda", x.stride(1) == 1 and seqlen > 1, dim, seqlen
    )
    grid = (max(1, triton.cdiv(seqlen, block_l)), triton.cdiv(dim, block_d), batch)
    _causal_conv1d_fwd_kernel[grid](
        x,
        weight,
        or_placeholder(bias, x),
        or_placeholder(seq_idx, x),
        or_placeholder(initial_states, x),
        out,
        final_states,
        dim,
        seqlen,
        *x.stride(),
        *weight.stride(),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        *(initial_states.stride() if initial_states is not None else (0, 0, 0)),
        *out.stride(),
        *final_states.stride(),
        WIDTH=width,
        HAS_BIAS=bias is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        HAS_INIT=initial_states is not None,
        SILU=silu,
        COMPUTE_DTYPE=compute_dtype(x, weight, bias, initial_states),
        BLOCK_D=block_d,
        BLOCK_L=block_l,
        BLOCK_HISTORY=triton.next_power_of_2(max(width - 1, 1)),
        num_warps=num_warps,
    )
