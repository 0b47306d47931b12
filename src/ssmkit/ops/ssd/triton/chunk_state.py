"""Stage 2: the state each chunk produces on its own (and, reused in backward, d(state) from y).

Forward:  S_j[p, n] = sum_{s in chunk j} exp(cs_last - cs_s) dt_s x_s[p] B_s[n]
          (with seq_idx: only positions in the segment the chunk ends in)
Backward: dS_j[p, n] = sum_{t in chunk j} exp(cs_t) dy_t[p] C_t[n]
          (the gradient reaching the state that enters chunk j, through y_t = exp(cs_t) C_t . S;
          with seq_idx only rows in the segment that continues from the previous chunk)
Both are one weighted (headdim x chunk) @ (chunk x dstate) product per chunk and head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.config import Tiles, next_pow2
from ssmkit.ops.ssd.triton.primitives import dot_in_fp32, mma
from ssmkit.ops.ssd.triton.varlen import ChunkTable


@triton.jit
def _chunk_state_kernel(
    u_ptr,
    v_ptr,
    dt_ptr,
    cs_ptr,
    seq_ptr,
    starts_ptr,
    ends_ptr,
    out_ptr,
    chunk_size,
    nchunks,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    stride_u_b,
    stride_u_l,
    stride_u_h,
    stride_u_p,
    stride_v_b,
    stride_v_l,
    stride_v_g,
    stride_v_n,
    stride_seq_b,
    stride_seq_l,
    FORWARD: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_pn = tl.program_id(0)
    j = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    group = h // heads_per_group
    start = tl.load(starts_ptr + j)
    length = tl.load(ends_ptr + j) - start
    n_blocks = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cs_base = cs_ptr + ((b * nheads + h) * nchunks + j) * chunk_size
    dt_base = dt_ptr + ((b * nheads + h) * nchunks + j) * chunk_size
    u_base = u_ptr + b * stride_u_b + h * stride_u_h + start.to(tl.int64) * stride_u_l
    v_base = v_ptr + b * stride_v_b + group * stride_v_g + start.to(tl.int64) * stride_v_l
    if FORWARD:
        cs_last = tl.load(cs_base + chunk_size - 1)
    if HAS_SEQ:
        if FORWARD:
            seq_ref = tl.load(seq_ptr + b * stride_seq_b + (start + length - 1) * stride_seq_l)
        else:
            seq_ref = tl.load(seq_ptr + b * stride_seq_b + tl.maximum(start - 1, 0) * stride_seq_l)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_chunk = offs_k < length
        u = tl.load(
            u_base + offs_k[None, :] * stride_u_l + offs_p[:, None] * stride_u_p,
            mask=(offs_p[:, None] < headdim) & in_chunk[None, :],
            other=0.0,
        )
        v = tl.load(
            v_base + offs_k[:, None] * stride_v_l + offs_n[None, :] * stride_v_n,
            mask=in_chunk[:, None] & (offs_n[None, :] < dstate),
            other=0.0,
        )
        cs = tl.load(cs_base + offs_k, mask=in_chunk, other=0.0)
        if FORWARD:
            weight = tl.exp(cs_last - cs) * tl.load(dt_base + offs_k, mask=in_chunk, other=0.0)
        else:
            weight = tl.exp(cs)
        keep = in_chunk
        if HAS_SEQ:
            seq = tl.load(
                seq_ptr + b * stride_seq_b + (start + offs_k) * stride_seq_l, mask=in_chunk, other=-1
            )
            keep = keep & (seq == seq_ref)
        weight = tl.where(keep, weight, 0.0)
        u = (u.to(tl.float32) * weight[None, :]).to(v.dtype)
        acc += mma(u, v, DOT_FP32)
    out = out_ptr + ((b * nchunks + j) * nheads + h) * headdim * dstate
    tl.store(
        out + offs_p[:, None] * dstate + offs_n[None, :],
        acc,
        mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate),
    )


def chunk_state(
    u: torch.Tensor,
    v: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
    seq_idx: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    tiles: Tiles,
    forward: bool,
) -> torch.Tensor:
    """u: (batch, seqlen, nheads, headdim) (x forward, dy backward)   v: (batch, seqlen, ngroups,
    dstate) (B forward, C backward)   dt_out, cs: (batch, nheads, nchunks, chunk_size) fp32
    seq_idx: None or (batch, seqlen) int32.
    Returns (batch, nchunks, nheads, headdim, dstate) fp32."""
    batch, _, nheads, headdim = u.shape
    ngroups, dstate = v.shape[2], v.shape[3]
    out = torch.empty(batch, table.nchunks, nheads, headdim, dstate, device=u.device, dtype=torch.float32)
    block_p = min(tiles.block_state, next_pow2(headdim))
    # One tile spans dstate (up to 128) so that x is read once per chunk, not once per dstate block.
    block_n = min(128, next_pow2(dstate))
    grid = (triton.cdiv(headdim, block_p) * triton.cdiv(dstate, block_n), table.nchunks, batch * nheads)
    has_seq = seq_idx is not None
    _chunk_state_kernel[grid](
        u,
        v,
        dt_out,
        cs,
        seq_idx if has_seq else table.starts,
        table.starts,
        table.ends,
        out,
        chunk_size,
        table.nchunks,
        nheads,
        nheads // ngroups,
        headdim,
        dstate,
        *u.stride(),
        *v.stride(),
        *(seq_idx.stride() if has_seq else (0, 0)),
        FORWARD=forward,
        HAS_SEQ=has_seq,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        BLOCK_K=tiles.block_k,
        DOT_FP32=dot_in_fp32(v.dtype, v.device),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out
