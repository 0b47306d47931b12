"""Backward kernel of the causal depthwise conv1d.

With pre = bias + sum_k w[k] * padded[t + k] and out = act(pre), let g = dL/dpre = dout * act'(pre).
Then, with the same sequence masks as the forward:
    dx[t]      = sum_s w[width - 1 - s] * g[t + s]                (+ dfinal where t feeds final_states)
    dw[k]      = sum_t g[t] * input[t - (width - 1) + k]
    dbias      = sum_t g[t]
    dinit[j]   = sum_{k <= j} w[k] * g[j - k]                      (+ dfinal where the history reaches it)
``pre`` is recomputed from x rather than saved: the window loads hit the cache, a saved copy would
cost a full extra read and write of a (batch, dim, seqlen) fp32 tensor.

Each program walks a range of positions for one block of channels of one row and keeps its dw and
dbias sums in registers; the per-program partial sums go to small buffers reduced by torch.sum
(deterministic, unlike atomics).

Known limit: with silu, g is needed at width shifted positions per tile and each is recomputed
from width shifted loads, so a tile issues about width**2 + 2 * width masked 2-D loads with their
address arithmetic. On an H100 (batch 4, dim 5376, seqlen 2048, width 4, bf16) this backward takes
0.5-0.6 ms, about 20 % of copy bandwidth for the bytes it must move: it is instruction bound, not
memory bound (flash-linear-attention's kernel measures the same). Computing g once per tile and
shifting it in registers (``tl.gather``) or loading the 2 * width - 1 shifted x tiles once would
remove most of that work; not done yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.conv1d.triton.conv_fwd import (
    compute_dtype,
    conv_pre_activation,
    load_padded,
    or_placeholder,
    tile_config,
)


@triton.jit
def _grad_pre_activation(
    x_row_ptr,
    init_row_ptr,
    seq_row_ptr,
    w_ptr,
    bias_ptr,
    dout_row_ptr,
    offs_d,
    mask_d,
    pos,
    seqlen,
    stride_x_d,
    stride_x_l,
    stride_init_d,
    stride_init_k,
    stride_seq_l,
    stride_w_d,
    stride_w_k,
    stride_dout_d,
    stride_dout_l,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    SILU: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """g = dL/dpre at positions ``pos`` (1-D block), zero outside [0, seqlen); also returns the
    sequence ids of those positions (-1 outside) for the caller's masks."""
    valid = (pos >= 0) & (pos < seqlen)
    seq = tl.zeros(pos.shape, dtype=tl.int64) - 1
    if HAS_SEQ_IDX:
        seq = tl.load(seq_row_ptr + pos * stride_seq_l, mask=valid, other=-1).to(tl.int64)
    g = tl.load(
        dout_row_ptr + offs_d[:, None] * stride_dout_d + pos[None, :] * stride_dout_l,
        mask=mask_d[:, None] & valid[None, :],
        other=0.0,
    ).to(COMPUTE_DTYPE)
    if SILU:
        pre = conv_pre_activation(
            x_row_ptr,
            init_row_ptr,
            seq_row_ptr,
            w_ptr,
            bias_ptr,
            offs_d,
            mask_d,
            pos,
            seq,
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
        sigmoid_pre = tl.sigmoid(pre)
        g = g * sigmoid_pre * (1.0 + pre * (1.0 - sigmoid_pre))
    return g, seq


@triton.jit
def _causal_conv1d_bwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    seq_idx_ptr,
    init_ptr,
    dout_ptr,
    dfinal_ptr,
    dx_ptr,
    dinit_ptr,
    dw_partial_ptr,
    dbias_partial_ptr,
    dim,
    seqlen,
    dim_bucket,
    length_bucket,
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
    stride_dout_b,
    stride_dout_d,
    stride_dout_l,
    stride_dfinal_b,
    stride_dfinal_d,
    stride_dfinal_k,
    stride_dx_b,
    stride_dx_d,
    stride_dx_l,
    stride_dinit_b,
    stride_dinit_d,
    stride_dinit_k,
    stride_dw_partial_p,
    stride_dbias_partial_p,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    SILU: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_HISTORY: tl.constexpr,
):
    # dim_bucket and length_bucket are not read: they are the autotuner's coarse cache key.
    positions_per_program = BLOCK_L * TILES_PER_PROGRAM
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    batch_row = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_w = tl.arange(0, BLOCK_W)
    x_row_ptr = x_ptr + batch_row * stride_x_b
    init_row_ptr = init_ptr + batch_row * stride_init_b
    seq_row_ptr = seq_idx_ptr + batch_row * stride_seq_b
    dout_row_ptr = dout_ptr + batch_row * stride_dout_b
    dfinal_row_ptr = dfinal_ptr + batch_row * stride_dfinal_b

    # final_states[j] is the input at position seqlen - (width - 1) + j, zeroed when that position is
    # not in the last sequence: its gradient flows back under the same mask.
    last_seq = 0
    if HAS_SEQ_IDX:
        last_seq = tl.load(seq_row_ptr + (seqlen - 1) * stride_seq_l).to(tl.int64)

    dw = tl.zeros([BLOCK_D, BLOCK_W], dtype=COMPUTE_DTYPE)
    dbias = tl.zeros([BLOCK_D], dtype=COMPUTE_DTYPE)
    start = pid_l * positions_per_program
    end = tl.minimum(start + positions_per_program, seqlen)
    for block_start in range(start, end, BLOCK_L):
        # int64 positions: position * stride exceeds 2**31 for long channel-last rows (seqlen * dim).
        offs_l = (block_start + tl.arange(0, BLOCK_L)).to(tl.int64)
        mask_l = offs_l < end
        dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=COMPUTE_DTYPE)
        g_here, seq_here = _grad_pre_activation(
            x_row_ptr,
            init_row_ptr,
            seq_row_ptr,
            w_ptr,
            bias_ptr,
            dout_row_ptr,
            offs_d,
            mask_d,
            offs_l,
            seqlen,
            stride_x_d,
            stride_x_l,
            stride_init_d,
            stride_init_k,
            stride_seq_l,
            stride_w_d,
            stride_w_k,
            stride_dout_d,
            stride_dout_l,
            WIDTH,
            HAS_BIAS,
            HAS_INIT,
            HAS_SEQ_IDX,
            SILU,
            COMPUTE_DTYPE,
        )
        g_here = tl.where(mask_l[None, :], g_here, 0.0)
        for s in tl.static_range(WIDTH):
            # Output position t + s reads x[t] through tap width - 1 - s.
            if s == 0:
                g = g_here
            else:
                g, seq_there = _grad_pre_activation(
                    x_row_ptr,
                    init_row_ptr,
                    seq_row_ptr,
                    w_ptr,
                    bias_ptr,
                    dout_row_ptr,
                    offs_d,
                    mask_d,
                    offs_l + s,
                    seqlen,
                    stride_x_d,
                    stride_x_l,
                    stride_init_d,
                    stride_init_k,
                    stride_seq_l,
                    stride_w_d,
                    stride_w_k,
                    stride_dout_d,
                    stride_dout_l,
                    WIDTH,
                    HAS_BIAS,
                    HAS_INIT,
                    HAS_SEQ_IDX,
                    SILU,
                    COMPUTE_DTYPE,
                )
                if HAS_SEQ_IDX:
                    g = tl.where((seq_there == seq_here)[None, :], g, 0.0)
            w_tap = tl.load(
                w_ptr + offs_d * stride_w_d + (WIDTH - 1 - s) * stride_w_k, mask=mask_d, other=0.0
            ).to(COMPUTE_DTYPE)
            dx += w_tap[:, None] * g
        if HAS_DFINAL:
            j = offs_l - (seqlen - (WIDTH - 1))
            feeds_final = (j >= 0) & mask_l
            if HAS_SEQ_IDX:
                feeds_final = feeds_final & (seq_here == last_seq)
            dx += tl.load(
                dfinal_row_ptr + offs_d[:, None] * stride_dfinal_d + j[None, :] * stride_dfinal_k,
                mask=mask_d[:, None] & feeds_final[None, :],
                other=0.0,
            ).to(COMPUTE_DTYPE)
        tl.store(
            dx_ptr + batch_row * stride_dx_b + offs_d[:, None] * stride_dx_d + offs_l[None, :] * stride_dx_l,
            dx.to(dx_ptr.dtype.element_ty),
            mask=mask_d[:, None] & mask_l[None, :],
        )

        for k in tl.static_range(WIDTH):
            inputs = load_padded(
                x_row_ptr,
                init_row_ptr,
                seq_row_ptr,
                offs_d,
                mask_d,
                offs_l - (WIDTH - 1 - k),
                seq_here,
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
            dw += tl.where(offs_w[None, :] == k, tl.sum(g_here * inputs, axis=1)[:, None], 0.0)
        dbias += tl.sum(g_here, axis=1)

    partial_row = batch_row * tl.num_programs(0) + pid_l
    tl.store(
        dw_partial_ptr + partial_row * stride_dw_partial_p + offs_d[:, None] * BLOCK_W + offs_w[None, :],
        dw,
        mask=mask_d[:, None],
    )
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + partial_row * stride_dbias_partial_p + offs_d, dbias, mask=mask_d)

    if HAS_INIT:
        if pid_l == 0:
            # dinit[j] = sum_{k <= j} w[k] g[j - k]: the history is read by the first width - 1 outputs,
            # of the first sequence only (load_padded's rule).
            offs_j = tl.arange(0, BLOCK_HISTORY)
            first_seq = 0
            if HAS_SEQ_IDX:
                first_seq = tl.load(seq_row_ptr).to(tl.int64)
            dinit = tl.zeros([BLOCK_D, BLOCK_HISTORY], dtype=COMPUTE_DTYPE)
            for k in tl.static_range(WIDTH - 1):
                pos = offs_j - k
                g, seq_there = _grad_pre_activation(
                    x_row_ptr,
                    init_row_ptr,
                    seq_row_ptr,
                    w_ptr,
                    bias_ptr,
                    dout_row_ptr,
                    offs_d,
                    mask_d,
                    pos,
                    seqlen,
                    stride_x_d,
                    stride_x_l,
                    stride_init_d,
                    stride_init_k,
                    stride_seq_l,
                    stride_w_d,
                    stride_w_k,
                    stride_dout_d,
                    stride_dout_l,
                    WIDTH,
                    HAS_BIAS,
                    HAS_INIT,
                    HAS_SEQ_IDX,
                    SILU,
                    COMPUTE_DTYPE,
                )
                if HAS_SEQ_IDX:
                    g = tl.where((seq_there == first_seq)[None, :], g, 0.0)
                w_k = tl.load(w_ptr + offs_d * stride_w_d + k * stride_w_k, mask=mask_d, other=0.0).to(
                    COMPUTE_DTYPE
                )
                dinit += w_k[:, None] * g
            if HAS_DFINAL:
                # With seqlen < width - 1 part of the history is still in final_states.
                j_final = offs_j - seqlen
                if HAS_SEQ_IDX:
                    # The history is kept in final_states only when the row holds a single sequence.
                    j_final = tl.where(first_seq == last_seq, j_final, -1)
                feeds_final = (j_final >= 0) & (offs_j < WIDTH - 1)
                dinit += tl.load(
                    dfinal_row_ptr + offs_d[:, None] * stride_dfinal_d + j_final[None, :] * stride_dfinal_k,
                    mask=mask_d[:, None] & feeds_final[None, :],
                    other=0.0,
                ).to(COMPUTE_DTYPE)
            tl.store(
                dinit_ptr
                + batch_row * stride_dinit_b
                + offs_d[:, None] * stride_dinit_d
                + offs_j[None, :] * stride_dinit_k,
                dinit.to(dinit_ptr.dtype.element_ty),
                mask=mask_d[:, None] & (offs_j < WIDTH - 1)[None, :],
            )


# Tile candidates (BLOCK_D, BLOCK_L, TILES_PER_PROGRAM, num_warps) for the GPU, per layout of x. The
# backward recomputes pre-activations width times per tile, so it needs many programs resident per SM
# to hide latency; the autotuner times these once per (dtypes, coarse size bucket) and keeps the
# fastest. Tiles are long along the contiguous axis of x so that loads coalesce.
_CHANNELS_LAST_TILES = [(64, 32, 2, 4), (128, 16, 4, 4), (32, 64, 2, 4), (64, 64, 1, 8)]
_CHANNELS_FIRST_TILES = [(8, 256, 1, 4), (16, 128, 2, 4), (4, 512, 1, 4), (16, 256, 1, 8)]


def _autotuned(tiles: list[tuple[int, int, int, int]]):
    configs = [
        triton.Config(dict(BLOCK_D=d, BLOCK_L=length, TILES_PER_PROGRAM=tiles_per_program), num_warps=warps)
        for d, length, tiles_per_program, warps in tiles
    ]
    # The partial-sum buffers are zeroed between timing runs; rows a config does not write stay zero.
    return triton.autotune(
        configs=configs,
        key=["dim_bucket", "length_bucket"],
        reset_to_zero=["dw_partial_ptr", "dbias_partial_ptr"],
    )(_causal_conv1d_bwd_kernel)


_TUNED = {True: _autotuned(_CHANNELS_LAST_TILES), False: _autotuned(_CHANNELS_FIRST_TILES)}


def _use_autotune(device: torch.device) -> bool:
    # Timing configs needs a GPU; the CPU interpreter runs one fixed tile.
    return device.type == "cuda"


def causal_conv1d_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    dout: torch.Tensor,
    dfinal_states: torch.Tensor | None,
    silu: bool,
    dx: torch.Tensor,
    dinitial_states: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel; writes dx (and dinitial_states) and returns (dweight, dbias) in the
    compute dtype.

    x, dout, dx: (batch, dim, seqlen) any strides   weight: (dim, width)   bias: (dim,)
    seq_idx: (batch, seqlen)   initial_states, dfinal_states, dinitial_states: (batch, dim, width - 1)
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    channels_last = x.stride(1) == 1 and seqlen > 1
    if _use_autotune(x.device):
        kernel = _TUNED[channels_last]
        tiles = _CHANNELS_LAST_TILES if channels_last else _CHANNELS_FIRST_TILES
        min_positions = min(length * tiles_per_program for _, length, tiles_per_program, _ in tiles)
        meta: dict = {}
        grid = lambda m: (
            triton.cdiv(seqlen, m["BLOCK_L"] * m["TILES_PER_PROGRAM"]),
            triton.cdiv(dim, m["BLOCK_D"]),
            batch,
        )
    else:
        # CPU interpreter: big tiles, and two tiles per program so that tests run the position loop.
        block_d, block_l, num_warps = tile_config(False, channels_last, dim, seqlen)
        kernel = _causal_conv1d_bwd_kernel
        min_positions = 2 * block_l
        meta = dict(BLOCK_D=block_d, BLOCK_L=block_l, TILES_PER_PROGRAM=2, num_warps=num_warps)
        grid = (triton.cdiv(seqlen, 2 * block_l), triton.cdiv(dim, block_d), batch)
    max_chunks = triton.cdiv(seqlen, min_positions)
    block_w = triton.next_power_of_2(width)
    dtype = torch.float64 if compute_dtype(x, weight, bias, initial_states) == tl.float64 else torch.float32
    # Row r = batch_row * chunks + chunk holds one program's partial sums (chunks depends on the tile).
    dw_partial = torch.zeros((batch * max_chunks, dim, block_w), dtype=dtype, device=x.device)
    dbias_partial = torch.zeros(
        (batch * max_chunks, dim) if bias is not None else (0,), dtype=dtype, device=x.device
    )
    kernel[grid](
        x,
        weight,
        or_placeholder(bias, x),
        or_placeholder(seq_idx, x),
        or_placeholder(initial_states, x),
        dout,
        or_placeholder(dfinal_states, x),
        dx,
        or_placeholder(dinitial_states, x),
        dw_partial,
        dbias_partial,
        dim,
        seqlen,
        min(triton.next_power_of_2(dim), 1 << 14),
        min(triton.next_power_of_2(batch * seqlen), 1 << 17),
        *x.stride(),
        *weight.stride(),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        *(initial_states.stride() if initial_states is not None else (0, 0, 0)),
        *dout.stride(),
        *(dfinal_states.stride() if dfinal_states is not None else (0, 0, 0)),
        *dx.stride(),
        *(dinitial_states.stride() if dinitial_states is not None else (0, 0, 0)),
        dw_partial.stride(0),
        dbias_partial.stride(0) if bias is not None else 0,
        WIDTH=width,
        HAS_BIAS=bias is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        HAS_INIT=initial_states is not None,
        HAS_DFINAL=dfinal_states is not None,
        SILU=silu,
        COMPUTE_DTYPE=compute_dtype(x, weight, bias, initial_states),
        BLOCK_W=block_w,
        BLOCK_HISTORY=triton.next_power_of_2(max(width - 1, 1)),
        **meta,
    )
    rows = dw_partial.shape[0]
    best = getattr(kernel, "best_config", None)
    if best is not None:
        # Only the chosen tile's rows were written by the final launch; the rest are stale or zero.
        rows = batch * triton.cdiv(seqlen, best.kwargs["BLOCK_L"] * best.kwargs["TILES_PER_PROGRAM"])
    dweight = dw_partial[:rows].sum(dim=0)[:, :width]
    dbias = dbias_partial[:rows].sum(dim=0) if bias is not None else None
    return dweight, dbias
