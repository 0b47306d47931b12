"""Stage 5: the output of each chunk, + D x, gated by silu(z).

y_t = exp(cs_t) C_t . S_in  +  sum_{s <= t in chunk} CB[t, s] exp(cs_t - cs_s) dt_s x_s  +  D x_t
out_t = y_t * silu(z_t)
The first term carries the state entering the chunk (with seq_idx: only rows still in the segment
the previous chunk ended in); the second is the quadratic, attention-like form inside the chunk.
When z is given the backward reuses this kernel without the gate, to recompute y + D x in fp32
for dz.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.config import Tiles, next_pow2
from ssmkit.ops.ssd.triton.primitives import dot_in_fp32, mma
from ssmkit.ops.ssd.triton.varlen import ChunkTable


@triton.jit
def _chunk_scan_kernel(
    cb_ptr,
    x_ptr,
    z_ptr,
    D_ptr,
    c_ptr,
    states_ptr,
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
    ngroups,
    headdim,
    dstate,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_z_b,
    stride_z_l,
    stride_z_h,
    stride_z_p,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_o_b,
    stride_o_l,
    stride_o_h,
    stride_o_p,
    stride_seq_b,
    stride_seq_l,
    stride_D_h,
    stride_D_p,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_mp = tl.program_id(0)
    j = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    group = h // heads_per_group
    p_blocks = tl.cdiv(headdim, BLOCK_N)
    t0 = (pid_mp // p_blocks) * BLOCK_M
    offs_p = (pid_mp % p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(starts_ptr + j)
    length = tl.load(ends_ptr + j) - start
    if t0 < length:
        offs_t = t0 + tl.arange(0, BLOCK_M)
        rows = offs_t < length
        cs_base = cs_ptr + ((b * nheads + h) * nchunks + j) * chunk_size
        dt_base = dt_ptr + ((b * nheads + h) * nchunks + j) * chunk_size
        x_base = x_ptr + b * stride_x_b + h * stride_x_h + start.to(tl.int64) * stride_x_l
        c_base = c_ptr + b * stride_c_b + group * stride_c_g + start.to(tl.int64) * stride_c_l
        cs_t = tl.load(cs_base + offs_t, mask=rows, other=0.0)
        if HAS_SEQ:
            seq_base = seq_ptr + b * stride_seq_b
            seq_t = tl.load(seq_base + (start + offs_t) * stride_seq_l, mask=rows, other=-1)
            seq_prev = tl.load(seq_base + tl.maximum(start - 1, 0) * stride_seq_l)

        # State entering the chunk: (rows x dstate) @ (dstate x headdim).
        state_base = states_ptr + ((b * nchunks + j) * nheads + h) * headdim * dstate
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(0, dstate, BLOCK_S):
            offs_n = n0 + tl.arange(0, BLOCK_S)
            c = tl.load(
                c_base + offs_t[:, None] * stride_c_l + offs_n[None, :] * stride_c_n,
                mask=rows[:, None] & (offs_n[None, :] < dstate),
                other=0.0,
            )
            state = tl.load(
                state_base + offs_p[None, :] * dstate + offs_n[:, None],
                mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < headdim),
                other=0.0,
            )
            acc += mma(c, state.to(c.dtype), DOT_FP32)
        carry = tl.exp(cs_t)
        if HAS_SEQ:
            carry = tl.where(seq_t == seq_prev, carry, 0.0)
        acc = acc * carry[:, None]

        # Inside the chunk: causal, decay-weighted CB against x.
        cb_base = cb_ptr + ((b * nchunks + j) * ngroups + group) * chunk_size * chunk_size
        for s0 in range(0, tl.minimum(t0 + BLOCK_M, length), BLOCK_K):
            offs_s = s0 + tl.arange(0, BLOCK_K)
            cols = offs_s < length
            cb = tl.load(
                cb_base + offs_t[:, None] * chunk_size + offs_s[None, :],
                mask=rows[:, None] & cols[None, :],
                other=0.0,
            )
            cs_s = tl.load(cs_base + offs_s, mask=cols, other=0.0)
            dt_s = tl.load(dt_base + offs_s, mask=cols, other=0.0)
            causal = (offs_s[None, :] <= offs_t[:, None]) & cols[None, :] & rows[:, None]
            if HAS_SEQ:
                seq_s = tl.load(seq_base + (start + offs_s) * stride_seq_l, mask=cols, other=-2)
                causal = causal & (seq_t[:, None] == seq_s[None, :])
            # Masked entries may read CB blocks above the diagonal that were never written: select,
            # never multiply, so garbage there cannot leak in as NaN * 0.
            decay = tl.exp(tl.where(causal, cs_t[:, None] - cs_s[None, :], float("-inf")))
            weight = tl.where(causal, cb * decay * dt_s[None, :], 0.0)
            x = tl.load(
                x_base + offs_s[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                mask=cols[:, None] & (offs_p[None, :] < headdim),
                other=0.0,
            )
            acc += mma(weight.to(x.dtype), x, DOT_FP32)

        tile = rows[:, None] & (offs_p[None, :] < headdim)
        if HAS_D:
            x_t = tl.load(
                x_base + offs_t[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=tile, other=0.0
            ).to(tl.float32)
            D = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=offs_p < headdim, other=0.0)
            acc += x_t * D.to(tl.float32)[None, :]
        if HAS_Z:
            z = tl.load(
                z_ptr
                + b * stride_z_b
                + h * stride_z_h
                + (start + offs_t).to(tl.int64)[:, None] * stride_z_l
                + offs_p[None, :] * stride_z_p,
                mask=tile,
                other=0.0,
            ).to(tl.float32)
            acc = acc * z * tl.sigmoid(z)
        out = out_ptr + b * stride_o_b + h * stride_o_h + (start + offs_t).to(tl.int64)[:, None] * stride_o_l
        tl.store(out + offs_p[None, :] * stride_o_p, acc.to(out_ptr.dtype.element_ty), mask=tile)


def d_strides(D: torch.Tensor | None) -> tuple[int, int]:
    """Strides (head, headdim) of D: (nheads,) broadcasts over headdim with stride 0."""
    if D is None:
        return 0, 0
    return (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))


def chunk_scan(
    cb: torch.Tensor,
    x: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
    C: torch.Tensor,
    states: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    tiles: Tiles,
    out: torch.Tensor,
) -> torch.Tensor:
    """cb: (batch, nchunks, ngroups, chunk_size, chunk_size) fp32   x, z, out: (batch, seqlen, nheads,
    headdim)   dt_out, cs: (batch, nheads, nchunks, chunk_size) fp32   C: (batch, seqlen, ngroups,
    dstate)   states: (batch, nchunks, nheads, headdim, dstate) fp32, entering each chunk
    D: None, (nheads,) or (nheads, headdim)   seq_idx: None or (batch, seqlen) int32.
    Writes out_t = (y_t + D x_t) * silu(z_t) into ``out`` and returns it."""
    batch, _, nheads, headdim = x.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    block_n = min(64 if x.is_cuda else 256, next_pow2(headdim))
    grid = (
        triton.cdiv(chunk_size, tiles.block_m) * triton.cdiv(headdim, block_n),
        table.nchunks,
        batch * nheads,
    )
    has_seq = seq_idx is not None and not table.varlen
    _chunk_scan_kernel[grid](
        cb,
        x,
        z if z is not None else x,
        D if D is not None else x,
        C,
        states,
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
        ngroups,
        headdim,
        dstate,
        *x.stride(),
        *(z.stride() if z is not None else (0, 0, 0, 0)),
        *C.stride(),
        *out.stride(),
        *(seq_idx.stride() if has_seq else (0, 0)),
        *d_strides(D),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_SEQ=has_seq,
        BLOCK_M=tiles.block_m,
        BLOCK_N=block_n,
        BLOCK_K=tiles.block_k,
        BLOCK_S=min(64 if x.is_cuda else 256, next_pow2(dstate)),
        DOT_FP32=dot_in_fp32(x.dtype, x.device),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out
