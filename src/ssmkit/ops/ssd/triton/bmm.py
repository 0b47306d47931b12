"""Stage 4: CB[t, s] = C_t . B_s for every pair of positions inside a chunk (one matrix per group).

Only blocks on or below the diagonal are computed: the chunk output uses s <= t only. The result
is kept in fp32, (batch, nchunks, ngroups, chunk_size, chunk_size), and shared by all heads of a
group, which is why this product is a stage of its own rather than recomputed per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.config import Tiles, next_pow2
from ssmkit.ops.ssd.triton.primitives import dot_in_fp32, mma
from ssmkit.ops.ssd.triton.varlen import ChunkTable


@triton.jit
def _bmm_kernel(
    c_ptr,
    b_ptr,
    starts_ptr,
    ends_ptr,
    out_ptr,
    chunk_size,
    nchunks,
    ngroups,
    dstate,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_ts = tl.program_id(0)
    j = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // ngroups).to(tl.int64)
    group = pid_bg % ngroups
    blocks = tl.cdiv(chunk_size, BLOCK_N)
    t0 = (pid_ts // blocks) * BLOCK_M
    s0 = (pid_ts % blocks) * BLOCK_N
    start = tl.load(starts_ptr + j)
    length = tl.load(ends_ptr + j) - start
    if s0 < t0 + BLOCK_M:
        offs_t = t0 + tl.arange(0, BLOCK_M)
        offs_s = s0 + tl.arange(0, BLOCK_N)
        c_base = c_ptr + b * stride_c_b + group * stride_c_g + start.to(tl.int64) * stride_c_l
        b_base = b_ptr + b * stride_b_b + group * stride_b_g + start.to(tl.int64) * stride_b_l
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, dstate, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            c = tl.load(
                c_base + offs_t[:, None] * stride_c_l + offs_k[None, :] * stride_c_n,
                mask=(offs_t[:, None] < length) & (offs_k[None, :] < dstate),
                other=0.0,
            )
            bt = tl.load(
                b_base + offs_s[None, :] * stride_b_l + offs_k[:, None] * stride_b_n,
                mask=(offs_s[None, :] < length) & (offs_k[:, None] < dstate),
                other=0.0,
            )
            acc += mma(c, bt, DOT_FP32)
        out = out_ptr + ((b * nchunks + j) * ngroups + group) * chunk_size * chunk_size
        tl.store(
            out + offs_t[:, None] * chunk_size + offs_s[None, :],
            acc,
            mask=(offs_t[:, None] < chunk_size) & (offs_s[None, :] < chunk_size),
        )


def bmm_chunk(
    C: torch.Tensor, B: torch.Tensor, table: ChunkTable, chunk_size: int, tiles: Tiles
) -> torch.Tensor:
    """C, B: (batch, seqlen, ngroups, dstate).
    Returns CB: (batch, nchunks, ngroups, chunk_size, chunk_size) fp32, valid on and below the
    diagonal blocks (entries of a chunk past its end are 0)."""
    batch, _, ngroups, dstate = C.shape
    out = torch.empty(
        batch, table.nchunks, ngroups, chunk_size, chunk_size, device=C.device, dtype=torch.float32
    )
    block = tiles.block_m
    grid = (triton.cdiv(chunk_size, block) ** 2, table.nchunks, batch * ngroups)
    _bmm_kernel[grid](
        C,
        B,
        table.starts,
        table.ends,
        out,
        chunk_size,
        table.nchunks,
        ngroups,
        dstate,
        *C.stride(),
        *B.stride(),
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_K=min(64, next_pow2(dstate)),
        DOT_FP32=dot_in_fp32(C.dtype, C.device),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out
