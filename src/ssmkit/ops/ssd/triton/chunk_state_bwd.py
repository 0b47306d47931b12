"""Backward of B and C, summed over the heads of each group.

  dC_t = sum_h exp(cs_t) dy_t @ S_in_j          (through the state entering the chunk)
       + sum_{s <= t} dCB[t, s] B_s              (through CB)
  dB_s = sum_h exp(cs_last - cs_s) dt_s x_s @ dS_out_j   (through the chunk state)
       + sum_{t >= s} dCB[t, s] C_t              (through CB)
One kernel serves both (IS_DB): rows are positions of a chunk, columns a block of dstate.
The dC pass also yields the state part of d(cs_t), exp(cs_t) C_t . (dy_t @ S_in), per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.config import Tiles, next_pow2
from ssmkit.ops.ssd.triton.primitives import dot_in_fp32, mma
from ssmkit.ops.ssd.triton.varlen import ChunkTable


@triton.jit
def _db_dc_kernel(
    u_ptr,
    v_ptr,
    dt_ptr,
    cs_ptr,
    states_ptr,
    dcb_ptr,
    c_ptr,
    seq_ptr,
    starts_ptr,
    ends_ptr,
    out_ptr,
    dcs_ptr,
    chunk_size,
    nchunks,
    nheads,
    heads_per_group,
    ngroups,
    headdim,
    dstate,
    seqlen,
    stride_u_b,
    stride_u_l,
    stride_u_h,
    stride_u_p,
    stride_v_b,
    stride_v_l,
    stride_v_g,
    stride_v_n,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_seq_b,
    stride_seq_l,
    IS_DB: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    j = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // ngroups).to(tl.int64)
    group = pid_bg % ngroups
    n_blocks = tl.cdiv(dstate, BLOCK_N)
    r0 = (pid_mn // n_blocks) * BLOCK_M
    offs_n = (pid_mn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(starts_ptr + j)
    length = tl.load(ends_ptr + j) - start
    if r0 < length:
        offs_r = r0 + tl.arange(0, BLOCK_M)
        rows = offs_r < length
        if HAS_SEQ:
            seq_base = seq_ptr + b * stride_seq_b
            seq_r = tl.load(seq_base + (start + offs_r) * stride_seq_l, mask=rows, other=-1)
            if IS_DB:
                seq_ref = tl.load(seq_base + (start + length - 1) * stride_seq_l)
            else:
                seq_ref = tl.load(seq_base + tl.maximum(start - 1, 0) * stride_seq_l)
        v_base = v_ptr + b * stride_v_b + group * stride_v_g + start.to(tl.int64) * stride_v_l
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if not IS_DB:
            c_base = c_ptr + b * stride_c_b + group * stride_c_g + start.to(tl.int64) * stride_c_l
            c = tl.load(
                c_base + offs_r[:, None] * stride_c_l + offs_n[None, :] * stride_c_n,
                mask=rows[:, None] & (offs_n[None, :] < dstate),
                other=0.0,
            ).to(tl.float32)

        # Through the states, one head at a time.
        for head in range(heads_per_group):
            h = group * heads_per_group + head
            u_base = u_ptr + b * stride_u_b + h * stride_u_h + start.to(tl.int64) * stride_u_l
            state_base = states_ptr + ((b * nchunks + j) * nheads + h) * headdim * dstate
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p0 in range(0, headdim, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                u = tl.load(
                    u_base + offs_r[:, None] * stride_u_l + offs_p[None, :] * stride_u_p,
                    mask=rows[:, None] & (offs_p[None, :] < headdim),
                    other=0.0,
                )
                state = tl.load(
                    state_base + offs_p[:, None] * dstate + offs_n[None, :],
                    mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate),
                    other=0.0,
                )
                part += mma(u.to(v_ptr.dtype.element_ty), state.to(v_ptr.dtype.element_ty), DOT_FP32)
            chunk_base = ((b * nheads + h) * nchunks + j) * chunk_size
            cs_r = tl.load(cs_ptr + chunk_base + offs_r, mask=rows, other=0.0)
            if IS_DB:
                weight = tl.exp(tl.load(cs_ptr + chunk_base + chunk_size - 1) - cs_r)
                weight = weight * tl.load(dt_ptr + chunk_base + offs_r, mask=rows, other=0.0)
            else:
                weight = tl.exp(cs_r)
            if HAS_SEQ:
                weight = tl.where(seq_r == seq_ref, weight, 0.0)
            acc += part * weight[:, None]
            if not IS_DB:
                # d(cs_t) += dy_t . y_off_t = exp(cs_t) C_t . (dy_t @ S_in), this block of dstate.
                dcs = tl.sum(part * c, axis=1) * weight
                tl.store(dcs_ptr + (chunk_base + offs_r) * n_blocks + pid_mn % n_blocks, dcs, mask=rows)

        # Through CB: dC uses dCB's rows (s <= t), dB its columns (t >= s).
        dcb_base = dcb_ptr + ((b * nchunks + j) * ngroups + group) * chunk_size * chunk_size
        if IS_DB:
            k_start = (r0 // BLOCK_K) * BLOCK_K
            k_end = length
        else:
            k_start = 0
            k_end = tl.minimum(r0 + BLOCK_M, length)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            cols = offs_k < length
            if IS_DB:
                keep = (offs_k[None, :] >= offs_r[:, None]) & rows[:, None] & cols[None, :]
                dcb = tl.load(dcb_base + offs_k[None, :] * chunk_size + offs_r[:, None], mask=keep, other=0.0)
            else:
                keep = (offs_k[None, :] <= offs_r[:, None]) & rows[:, None] & cols[None, :]
                dcb = tl.load(dcb_base + offs_r[:, None] * chunk_size + offs_k[None, :], mask=keep, other=0.0)
            # Entries outside the triangle may be unwritten blocks: select rather than multiply.
            dcb = tl.where(keep, dcb, 0.0)
            v = tl.load(
                v_base + offs_k[:, None] * stride_v_l + offs_n[None, :] * stride_v_n,
                mask=cols[:, None] & (offs_n[None, :] < dstate),
                other=0.0,
            )
            acc += mma(dcb.to(v.dtype), v, DOT_FP32)

        out = out_ptr + ((b * seqlen + start + offs_r)[:, None] * ngroups + group) * dstate + offs_n[None, :]
        tl.store(out, acc, mask=rows[:, None] & (offs_n[None, :] < dstate))


def chunk_state_bwd_db_dc(
    x: torch.Tensor,
    dy: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    states: torch.Tensor,
    dstates: torch.Tensor,
    dcb: torch.Tensor,
    seq_idx: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (batch, seqlen, nheads, headdim)   dy: contiguous like x (fp32, or x's half dtype)
    B, C: (batch, seqlen, ngroups, dstate)   states / dstates: (batch, nchunks, nheads, headdim,
    dstate) fp32, the states entering each chunk / the gradients of the states leaving each chunk
    dcb: from bmm_bwd.
    Returns dB, dC: (batch, seqlen, ngroups, dstate) fp32 and d(cs) through the states entering the
    chunks, (batch, nheads, nchunks, chunk_size) fp32."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    has_seq = seq_idx is not None and not table.varlen
    block_n = min(tiles.block_state, next_pow2(dstate))
    grid = (
        triton.cdiv(chunk_size, tiles.block_m) * triton.cdiv(dstate, block_n),
        table.nchunks,
        batch * ngroups,
    )
    dcs = torch.zeros(*dt_out.shape, triton.cdiv(dstate, block_n), device=x.device, dtype=torch.float32)
    outputs = []
    for is_db in (True, False):
        # dB pairs x with dS_out and dCB with C; dC pairs dy with S_in and dCB with B.
        u, v, st = (x, C, dstates) if is_db else (dy, B, states)
        out = torch.zeros(batch, seqlen, ngroups, dstate, device=x.device, dtype=torch.float32)
        _db_dc_kernel[grid](
            u,
            v,
            dt_out,
            cs,
            st,
            dcb,
            C,
            seq_idx if has_seq else table.starts,
            table.starts,
            table.ends,
            out,
            dcs,
            chunk_size,
            table.nchunks,
            nheads,
            nheads // ngroups,
            ngroups,
            headdim,
            dstate,
            seqlen,
            *u.stride(),
            *v.stride(),
            *C.stride(),
            *(seq_idx.stride() if has_seq else (0, 0)),
            IS_DB=is_db,
            HAS_SEQ=has_seq,
            BLOCK_M=tiles.block_m,
            BLOCK_N=block_n,
            BLOCK_K=tiles.block_k,
            BLOCK_P=min(64, next_pow2(headdim)),
            DOT_FP32=dot_in_fp32(x.dtype, x.device),
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
        outputs.append(out)
    return outputs[0], outputs[1], dcs.sum(dim=-1)
