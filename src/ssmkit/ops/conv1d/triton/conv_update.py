"""Decode kernel of the causal conv1d: outputs for a few new inputs, and the state window shifted in place.

``extended`` = [conv_state, x] along time (state_len + seqlen_step columns). Output t is the
width-tap convolution ending at column state_len + t; the new state is the last state_len columns.
One program owns a block of channels of one batch row and reads everything it needs (old state and
x) before it writes the state back, with a barrier in between: the old values of a channel may sit
in other threads than the ones that store its new values.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ssmkit.ops.conv1d.triton.conv_fwd import compute_dtype, or_placeholder


@triton.jit
def _load_extended(
    state_row_ptr,
    x_row_ptr,
    offs_d,
    mask_d,
    columns,
    valid,
    state_len,
    stride_state_d,
    stride_state_k,
    stride_x_d,
    stride_x_l,
    COMPUTE_DTYPE: tl.constexpr,
):
    """extended[:, columns] for the channels offs_d, as (BLOCK_D, len(columns)); zero where not valid."""
    in_state = valid & (columns < state_len)
    in_x = valid & (columns >= state_len)
    values = tl.load(
        state_row_ptr + offs_d[:, None] * stride_state_d + columns[None, :] * stride_state_k,
        mask=mask_d[:, None] & in_state[None, :],
        other=0.0,
    ).to(COMPUTE_DTYPE)
    values += tl.load(
        x_row_ptr + offs_d[:, None] * stride_x_d + (columns - state_len)[None, :] * stride_x_l,
        mask=mask_d[:, None] & in_x[None, :],
        other=0.0,
    ).to(COMPUTE_DTYPE)
    return values


@triton.jit
def _causal_conv1d_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    indices_ptr,
    dim,
    seqlen,
    state_len,
    stride_x_b,
    stride_x_d,
    stride_x_l,
    stride_state_row,
    stride_state_d,
    stride_state_k,
    stride_w_d,
    stride_w_k,
    stride_out_b,
    stride_out_d,
    stride_out_l,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_d = tl.program_id(0)
    batch_row = tl.program_id(1).to(tl.int64)
    if HAS_INDICES:
        state_row = tl.load(indices_ptr + batch_row).to(tl.int64)
    else:
        state_row = batch_row
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    state_row_ptr = state_ptr + state_row * stride_state_row
    x_row_ptr = x_ptr + batch_row * stride_x_b

    # Every read of the old state happens in this loop and in the new-state load below, all before
    # the barrier; only then is the state overwritten.
    for t_start in range(0, seqlen, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        mask_t = offs_t < seqlen
        if HAS_BIAS:
            acc = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(COMPUTE_DTYPE)[:, None] + tl.zeros(
                [1, BLOCK_T], dtype=COMPUTE_DTYPE
            )
        else:
            acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=COMPUTE_DTYPE)
        for k in tl.static_range(WIDTH):
            w_k = tl.load(w_ptr + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0).to(
                COMPUTE_DTYPE
            )
            columns = state_len + offs_t - (WIDTH - 1) + k
            acc += w_k[:, None] * _load_extended(
                state_row_ptr,
                x_row_ptr,
                offs_d,
                mask_d,
                columns,
                mask_t,
                state_len,
                stride_state_d,
                stride_state_k,
                stride_x_d,
                stride_x_l,
                COMPUTE_DTYPE,
            )
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(
            out_ptr
            + batch_row * stride_out_b
            + offs_d[:, None] * stride_out_d
            + offs_t[None, :] * stride_out_l,
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_d[:, None] & mask_t[None, :],
        )

    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < state_len
    new_state = _load_extended(
        state_row_ptr,
        x_row_ptr,
        offs_d,
        mask_d,
        offs_s + seqlen,
        mask_s,
        state_len,
        stride_state_d,
        stride_state_k,
        stride_x_d,
        stride_x_l,
        COMPUTE_DTYPE,
    )
    tl.debug_barrier()
    tl.store(
        state_row_ptr + offs_d[:, None] * stride_state_d + offs_s[None, :] * stride_state_k,
        new_state.to(state_ptr.dtype.element_ty),
        mask=mask_d[:, None] & mask_s[None, :],
    )


@functools.cache
def _update_config(is_cuda: bool, dim: int, seqlen: int, state_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_T, BLOCK_S, num_warps)."""
    block_t = min(16, triton.next_power_of_2(max(seqlen, 1)))
    block_s = triton.next_power_of_2(state_len)
    if not is_cuda:
        return min(256, triton.next_power_of_2(dim)), block_t, block_s, 4
    # Decode moves a few bytes per channel: small tiles give enough programs at batch 1
    # (dim / 128 of them for dim = 5000-10000, Mamba-2's conv width).
    block_d = min(triton.next_power_of_2(dim), max(32, 512 // max(block_s, block_t)))
    return block_d, block_t, block_s, 4 if block_d * block_s >= 512 else 2


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    conv_state_indices: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Launch the decode kernel; writes ``out`` and updates ``conv_state`` in place.

    x, out: (batch, dim, seqlen_step)   conv_state: (pool, dim, state_len >= width - 1)
    weight: (dim, width)   bias: (dim,)   conv_state_indices: (batch,) int rows of conv_state, or None
    """
    batch, dim, seqlen = x.shape
    state_len = conv_state.shape[-1]
    width = weight.shape[1]
    block_d, block_t, block_s, num_warps = _update_config(x.device.type == "cuda", dim, seqlen, state_len)
    grid = (triton.cdiv(dim, block_d), batch)
    _causal_conv1d_update_kernel[grid](
        x,
        conv_state,
        weight,
        or_placeholder(bias, x),
        out,
        or_placeholder(conv_state_indices, x),
        dim,
        seqlen,
        state_len,
        *x.stride(),
        *conv_state.stride(),
        *weight.stride(),
        *out.stride(),
        WIDTH=width,
        HAS_BIAS=bias is not None,
        SILU=silu,
        HAS_INDICES=conv_state_indices is not None,
        COMPUTE_DTYPE=compute_dtype(x, weight, bias, conv_state),
        BLOCK_D=block_d,
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        num_warps=num_warps,
    )
