"""Backward of the x-path: dx, and the pieces of d(dt) and d(cs) that go with it.

With dy the gradient of y_ssm (after the gate) and dS_out_j the gradient of the state leaving
chunk j, for each position s of chunk j:
  inner_s[p] = sum_{t >= s} CB[t, s] exp(cs_t - cs_s) dy_t[p]          (through the chunk output)
             + exp(cs_last - cs_s) sum_n B_s[n] dS_out_j[p, n]          (through the chunk state)
  dx_s = dt_s inner_s + D dy_s        d(dt_s) = x_s . inner_s        dD = sum_s dy_s * x_s
x_s . (state part) is returned on its own as well: through exp(cs_last - cs_s) it feeds d(cs_s)
and d(cs_last) (the cumsum backward). The quadratic part of d(cs) comes from bmm_bwd.py, which
forms the per-head matrix M[t, s] = CB[t, s] exp(cs_t - cs_s) dt_s (dy_t . x_s) anyway.
dD is summed here too, over each program's rows (dy_s and x_s are in registers already), into one
partial row per program, then over programs by the caller: done as separate elementwise and
reduction passes it cost ~0.6 ms at (4, 8192), h=32, p=64 on an H100 (fp32 copies of dy and x,
their product, then the sum), 13% of the whole backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.chunk_scan import d_strides
from ssmkit.ops.ssd.triton.config import Tiles, next_pow2
from ssmkit.ops.ssd.triton.primitives import dot_in_fp32, mma
from ssmkit.ops.ssd.triton.varlen import ChunkTable


@triton.jit
def _chunk_scan_bwd_dx_kernel(
    cb_ptr,
    x_ptr,
    dy_ptr,
    dt_ptr,
    cs_ptr,
    b_ptr,
    dstates_ptr,
    D_ptr,
    seq_ptr,
    starts_ptr,
    ends_ptr,
    dx_ptr,
    ddt_ptr,
    ddt_state_ptr,
    dD_ptr,
    chunk_size,
    nchunks,
    nheads,
    heads_per_group,
    ngroups,
    headdim,
    dstate,
    seqlen,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    stride_seq_b,
    stride_seq_l,
    stride_D_h,
    stride_D_p,
    HAS_D: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    j = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    group = h // heads_per_group
    s0 = pid_m * BLOCK_M
    start = tl.load(starts_ptr + j)
    length = tl.load(ends_ptr + j) - start
    if s0 < length:
        offs_s = s0 + tl.arange(0, BLOCK_M)
        offs_p = tl.arange(0, BLOCK_N)
        rows = offs_s < length
        tile = rows[:, None] & (offs_p[None, :] < headdim)
        chunk_base = ((b * nheads + h) * nchunks + j) * chunk_size
        cs_s = tl.load(cs_ptr + chunk_base + offs_s, mask=rows, other=0.0)
        dt_s = tl.load(dt_ptr + chunk_base + offs_s, mask=rows, other=0.0)
        cs_last = tl.load(cs_ptr + chunk_base + chunk_size - 1)
        x_base = x_ptr + b * stride_x_b + h * stride_x_h + start.to(tl.int64) * stride_x_l
        # dy and dx are contiguous (batch, seqlen, nheads, headdim) buffers.
        dy_base = dy_ptr + ((b * seqlen + start) * nheads + h) * headdim
        x_s = tl.load(
            x_base + offs_s[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=tile, other=0.0
        )
        if HAS_SEQ:
            seq_base = seq_ptr + b * stride_seq_b
            seq_s = tl.load(seq_base + (start + offs_s) * stride_seq_l, mask=rows, other=-1)
            seq_last = tl.load(seq_base + (start + length - 1) * stride_seq_l)

        # Through the chunk state: (rows x dstate) @ (dstate x headdim).
        b_base = b_ptr + b * stride_b_b + group * stride_b_g + start.to(tl.int64) * stride_b_l
        ds_base = dstates_ptr + ((b * nchunks + j) * nheads + h) * headdim * dstate
        acc_state = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(0, dstate, BLOCK_S):
            offs_n = n0 + tl.arange(0, BLOCK_S)
            bs = tl.load(
                b_base + offs_s[:, None] * stride_b_l + offs_n[None, :] * stride_b_n,
                mask=rows[:, None] & (offs_n[None, :] < dstate),
                other=0.0,
            )
            ds = tl.load(
                ds_base + offs_p[None, :] * dstate + offs_n[:, None],
                mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < headdim),
                other=0.0,
            )
            acc_state += mma(bs, ds.to(bs.dtype), DOT_FP32)
        to_end = tl.exp(cs_last - cs_s)
        if HAS_SEQ:
            to_end = tl.where(seq_s == seq_last, to_end, 0.0)
        state_part = acc_state * to_end[:, None]

        # Through the chunk output: sum over t >= s.
        cb_base = cb_ptr + ((b * nchunks + j) * ngroups + group) * chunk_size * chunk_size
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range((s0 // BLOCK_K) * BLOCK_K, length, BLOCK_K):
            offs_t = t0 + tl.arange(0, BLOCK_K)
            cols = offs_t < length
            cb_ts = tl.load(
                cb_base + offs_t[None, :] * chunk_size + offs_s[:, None],
                mask=rows[:, None] & cols[None, :],
                other=0.0,
            )
            cs_t = tl.load(cs_ptr + chunk_base + offs_t, mask=cols, other=0.0)
            causal = (offs_t[None, :] >= offs_s[:, None]) & cols[None, :] & rows[:, None]
            if HAS_SEQ:
                seq_t = tl.load(seq_base + (start + offs_t) * stride_seq_l, mask=cols, other=-2)
                causal = causal & (seq_t[None, :] == seq_s[:, None])
            decay = tl.exp(tl.where(causal, cs_t[None, :] - cs_s[:, None], float("-inf")))
            weight = tl.where(causal, cb_ts * decay, 0.0)
            dy = tl.load(
                dy_base + offs_t[:, None] * (nheads * headdim) + offs_p[None, :],
                mask=cols[:, None] & (offs_p[None, :] < headdim),
                other=0.0,
            )
            acc += mma(weight.to(x_s.dtype), dy.to(x_s.dtype), DOT_FP32)

        inner = acc + state_part
        x_f = x_s.to(tl.float32)
        dx = inner * dt_s[:, None]
        if HAS_D:
            dy_s = tl.load(
                dy_base + offs_s[:, None] * (nheads * headdim) + offs_p[None, :], mask=tile, other=0.0
            )
            D = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=offs_p < headdim, other=0.0)
            dy_f = dy_s.to(tl.float32)
            dx += dy_f * D.to(tl.float32)[None, :]
            # This program's share of dD: its rows of dy * x, one partial row per program (no atomics:
            # the result does not depend on the order programs run in).
            partial = (pid_bh * nchunks + j) * tl.num_programs(0) + pid_m
            tl.store(
                dD_ptr + partial.to(tl.int64) * headdim + offs_p,
                tl.sum(dy_f * x_f, axis=0),
                mask=offs_p < headdim,
            )
        tl.store(
            dx_ptr + ((b * seqlen + start + offs_s)[:, None] * nheads + h) * headdim + offs_p[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=tile,
        )
        tl.store(ddt_ptr + chunk_base + offs_s, tl.sum(x_f * inner, axis=1), mask=rows)
        tl.store(ddt_state_ptr + chunk_base + offs_s, tl.sum(x_f * state_part, axis=1), mask=rows)


def chunk_scan_bwd_dx(
    cb: torch.Tensor,
    x: torch.Tensor,
    dy: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
    B: torch.Tensor,
    dstates: torch.Tensor,
    D: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cb: (batch, nchunks, ngroups, chunk_size, chunk_size) fp32   x: (batch, seqlen, nheads, headdim)
    dy: contiguous like x (fp32, or x's half dtype)
    dt_out, cs: (batch, nheads, nchunks, chunk_size) fp32
    B: (batch, seqlen, ngroups, dstate)   dstates: (batch, nchunks, nheads, headdim, dstate) fp32, the
    gradient of the state leaving each chunk   D: None, (nheads,) or (nheads, headdim).
    Returns dx (like x), d(dt) and its state part (batch, nheads, nchunks, chunk_size) fp32, and dD
    (fp32, shaped like D) or None without D."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    ddt = torch.zeros_like(dt_out)
    ddt_state = torch.zeros_like(dt_out)
    has_seq = seq_idx is not None and not table.varlen
    # One tile spans the whole headdim so that x . inner is complete inside a program.
    block_n = next_pow2(headdim)
    block_m = min(tiles.block_m, 64 if headdim <= 64 else 32) if x.is_cuda else tiles.block_m
    grid = (triton.cdiv(chunk_size, block_m), table.nchunks, batch * nheads)
    # One row of dD partial sums per program; programs past a short chunk's end leave theirs zero.
    dD_partial = (
        torch.zeros(batch, nheads, table.nchunks * grid[0], headdim, device=x.device, dtype=torch.float32)
        if D is not None
        else None
    )
    _chunk_scan_bwd_dx_kernel[grid](
        cb,
        x,
        dy,
        dt_out,
        cs,
        B,
        dstates,
        D if D is not None else x,
        seq_idx if has_seq else table.starts,
        table.starts,
        table.ends,
        dx,
        ddt,
        ddt_state,
        dD_partial if D is not None else ddt,
        chunk_size,
        table.nchunks,
        nheads,
        nheads // ngroups,
        ngroups,
        headdim,
        dstate,
        seqlen,
        *x.stride(),
        *B.stride(),
        *(seq_idx.stride() if has_seq else (0, 0)),
        *d_strides(D),
        HAS_D=D is not None,
        HAS_SEQ=has_seq,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=tiles.block_k,
        BLOCK_S=min(64 if x.is_cuda else 256, next_pow2(dstate)),
        DOT_FP32=dot_in_fp32(x.dtype, x.device),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    dD = None
    if dD_partial is not None:
        dD = dD_partial.sum(dim=(0, 2))  # (nheads, headdim)
        if D.dim() == 1:
            dD = dD.sum(dim=-1)
    return dx, ddt, ddt_state, dD
