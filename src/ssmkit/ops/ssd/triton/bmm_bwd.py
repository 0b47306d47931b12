"""Backward of CB: dCB[t, s] = sum over the heads h of a group of exp(cs_t - cs_s) dt_s (dy_t . x_s),
for s <= t in the same chunk (and segment). Summing over heads here, once, turns dB and dC into
one (chunk x chunk) @ (chunk x dstate) product per group instead of one per head.

The same tiles give the quadratic part of d(cs): with M_h[t, s] = CB[t, s] exp(cs_t - cs_s) dt_s
(dy_t . x_s), d(cs_t) gets the row sum of M_h minus its column sum. Both sums are taken here from
the very same fp32 values of M_h: after the reverse cumulative sum that turns d(cs) into d(dt * A)
the terms with both t and s past a position cancel, and they cancel exactly only when they are the
same numbers. (Taking the row sums from the recomputed output, dy . y, and the column sums from
dt * d(dt) rounds the two sides differently; in bf16 that error dominated dA.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.config import Tiles, next_pow2
from ssmkit.ops.ssd.triton.primitives import dot_in_fp32, mma
from ssmkit.ops.ssd.triton.varlen import ChunkTable


@triton.jit
def _bmm_bwd_kernel(
    x_ptr,
    dy_ptr,
    dt_ptr,
    cs_ptr,
    cb_ptr,
    seq_ptr,
    starts_ptr,
    ends_ptr,
    out_ptr,
    rows_ptr,
    cols_ptr,
    chunk_size,
    nchunks,
    nheads,
    heads_per_group,
    ngroups,
    headdim,
    seqlen,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_seq_b,
    stride_seq_l,
    HAS_SEQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_ts = tl.program_id(0)
    j = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // ngroups).to(tl.int64)
    group = pid_bg % ngroups
    nblocks = tl.cdiv(chunk_size, BLOCK_N)
    t0 = (pid_ts // nblocks) * BLOCK_M
    s0 = (pid_ts % nblocks) * BLOCK_N
    start = tl.load(starts_ptr + j)
    length = tl.load(ends_ptr + j) - start
    if s0 < t0 + BLOCK_M:
        offs_t = t0 + tl.arange(0, BLOCK_M)
        offs_s = s0 + tl.arange(0, BLOCK_N)
        causal = (
            (offs_s[None, :] <= offs_t[:, None]) & (offs_t[:, None] < length) & (offs_s[None, :] < length)
        )
        if HAS_SEQ:
            seq_base = seq_ptr + b * stride_seq_b
            seq_t = tl.load(seq_base + (start + offs_t) * stride_seq_l, mask=offs_t < length, other=-1)
            seq_s = tl.load(seq_base + (start + offs_s) * stride_seq_l, mask=offs_s < length, other=-2)
            causal = causal & (seq_t[:, None] == seq_s[None, :])
        tile = ((b * nchunks + j) * ngroups + group) * chunk_size * chunk_size
        tile += offs_t[:, None] * chunk_size + offs_s[None, :]
        cb = tl.load(cb_ptr + tile, mask=causal, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for head in range(heads_per_group):
            h = group * heads_per_group + head
            x_base = x_ptr + b * stride_x_b + h * stride_x_h + start.to(tl.int64) * stride_x_l
            dy_base = dy_ptr + ((b * seqlen + start) * nheads + h) * headdim
            dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p0 in range(0, headdim, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                dy = tl.load(
                    dy_base + offs_t[:, None] * (nheads * headdim) + offs_p[None, :],
                    mask=(offs_t[:, None] < length) & (offs_p[None, :] < headdim),
                    other=0.0,
                )
                xt = tl.load(
                    x_base + offs_s[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                    mask=(offs_s[None, :] < length) & (offs_p[:, None] < headdim),
                    other=0.0,
                )
                dot += mma(dy.to(xt.dtype), xt, DOT_FP32)
            chunk_base = ((b * nheads + h) * nchunks + j) * chunk_size
            cs_t = tl.load(cs_ptr + chunk_base + offs_t, mask=offs_t < length, other=0.0)
            cs_s = tl.load(cs_ptr + chunk_base + offs_s, mask=offs_s < length, other=0.0)
            dt_s = tl.load(dt_ptr + chunk_base + offs_s, mask=offs_s < length, other=0.0)
            decay = tl.exp(tl.where(causal, cs_t[:, None] - cs_s[None, :], float("-inf")))
            dcb = tl.where(causal, dot * decay * dt_s[None, :], 0.0)
            acc += dcb
            # CB may hold unwritten blocks outside the triangle: select, never multiply.
            m = tl.where(causal, dcb * cb, 0.0)
            sums = chunk_base * nblocks
            tl.store(
                rows_ptr + sums + offs_t * nblocks + s0 // BLOCK_N,
                tl.sum(m, axis=1),
                mask=offs_t < chunk_size,
            )
            tl.store(
                cols_ptr + sums + offs_s * nblocks + t0 // BLOCK_M,
                tl.sum(m, axis=0),
                mask=offs_s < chunk_size,
            )
        tl.store(
            out_ptr + tile,
            acc,
            mask=(offs_t[:, None] < chunk_size) & (offs_s[None, :] < chunk_size),
        )


def bmm_chunk_bwd(
    x: torch.Tensor,
    dy: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
    cb: torch.Tensor,
    seq_idx: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (batch, seqlen, nheads, headdim)   dy: contiguous like x (fp32, or the half dtype of x)
    dt_out, cs: (batch, nheads, nchunks, chunk_size) fp32   cb: (batch, nchunks, ngroups, chunk_size,
    chunk_size) fp32 from bmm_chunk   seq_idx: None or (batch, seqlen) int32.
    Returns dCB like cb (valid on and below the diagonal blocks) and the quadratic part of d(cs),
    row sums minus column sums of M_h, (batch, nheads, nchunks, chunk_size) fp32."""
    ngroups = cb.shape[2]
    batch, seqlen, nheads, headdim = x.shape
    out = torch.empty(
        batch, table.nchunks, ngroups, chunk_size, chunk_size, device=x.device, dtype=torch.float32
    )
    block = tiles.block_m
    nblocks = triton.cdiv(chunk_size, block)
    # Partial sums per tile of the other axis, added up below (deterministic, unlike atomics);
    # tiles above the diagonal are skipped and leave their zeros.
    rows = torch.zeros(
        batch, nheads, table.nchunks, chunk_size, nblocks, device=x.device, dtype=torch.float32
    )
    cols = torch.zeros_like(rows)
    has_seq = seq_idx is not None and not table.varlen
    _bmm_bwd_kernel[(triton.cdiv(chunk_size, block) ** 2, table.nchunks, batch * ngroups)](
        x,
        dy,
        dt_out,
        cs,
        cb,
        seq_idx if has_seq else table.starts,
        table.starts,
        table.ends,
        out,
        rows,
        cols,
        chunk_size,
        table.nchunks,
        nheads,
        nheads // ngroups,
        ngroups,
        headdim,
        seqlen,
        *x.stride(),
        *(seq_idx.stride() if has_seq else (0, 0)),
        HAS_SEQ=has_seq,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_P=min(64, next_pow2(headdim)),
        DOT_FP32=dot_in_fp32(x.dtype, x.device),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out, rows.sum(dim=-1) - cols.sum(dim=-1)
