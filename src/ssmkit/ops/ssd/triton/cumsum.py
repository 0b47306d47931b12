"""Stage 1: dt processing and the cumulative sum of dt * A inside each chunk.

dt_t <- clamp(softplus(dt_t + dt_bias)), a_t = dt_t * A, cs_t = sum_{u <= t in chunk} a_u.
Both are stored per chunk, (batch, nheads, nchunks, chunk_size) in fp32; positions past a chunk's
end hold dt = 0, so cs there equals the chunk's total decay, which is what the later stages read at
index chunk_size - 1. The backward kernel turns d(cs) into d(a) by a reverse cumulative sum and
then applies the chain rule through A, the clamp and the softplus.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.config import next_pow2
from ssmkit.ops.ssd.triton.varlen import ChunkTable

_SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: above it softplus(x) == x in fp32


@triton.jit
def _softplus(value):
    # log1p(exp(x)) written with log and the classic log1p correction (log(u) * e / (u - 1)),
    # which keeps full relative precision for very negative x where 1 + exp(x) rounds.
    e = tl.exp(tl.minimum(value, 20.0))
    u = 1.0 + e
    corrected = tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0)
    small = tl.where(u == 1.0, e, corrected)
    return tl.where(value > 20.0, value, small)


@triton.jit
def _processed_dt(
    raw, h, bias_ptr, lo, hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr
):
    """dt after bias, softplus and clamp, and the pre-clamp value (the clamp's backward needs it)."""
    if HAS_BIAS:
        raw = raw + tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        unclamped = _softplus(raw)
    else:
        unclamped = raw
    value = unclamped
    if HAS_LIMIT:
        value = tl.minimum(tl.maximum(value, lo), hi)
    return raw, unclamped, value


@triton.jit
def _cumsum_fwd_kernel(
    dt_ptr,
    A_ptr,
    bias_ptr,
    starts_ptr,
    ends_ptr,
    dt_out_ptr,
    cs_ptr,
    chunk_size,
    nchunks,
    nheads,
    lo,
    hi,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    j = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start = tl.load(starts_ptr + j)
    end = tl.load(ends_ptr + j)
    offs = tl.arange(0, BLOCK_Q)
    valid = offs < end - start
    raw = tl.load(
        dt_ptr + b * stride_dt_b + (start + offs).to(tl.int64) * stride_dt_l + h * stride_dt_h,
        mask=valid,
        other=0.0,
    ).to(tl.float32)
    _, _, value = _processed_dt(raw, h, bias_ptr, lo, hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    value = tl.where(valid, value, 0.0)
    cs = tl.cumsum(value * tl.load(A_ptr + h).to(tl.float32), axis=0)
    out = ((b * nheads + h) * nchunks + j) * chunk_size + offs
    tl.store(dt_out_ptr + out, value, mask=offs < chunk_size)
    tl.store(cs_ptr + out, cs, mask=offs < chunk_size)


@triton.jit
def _cumsum_bwd_kernel(
    dt_ptr,
    A_ptr,
    bias_ptr,
    starts_ptr,
    ends_ptr,
    dt_out_ptr,
    dcs_ptr,
    ddt_chunk_ptr,
    ddt_state_ptr,
    dlast_ptr,
    ddt_ptr,
    dA_part_ptr,
    chunk_size,
    nchunks,
    nheads,
    seqlen,
    lo,
    hi,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    j = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start = tl.load(starts_ptr + j)
    end = tl.load(ends_ptr + j)
    offs = tl.arange(0, BLOCK_Q)
    valid = offs < end - start
    chunk = ((b * nheads + h) * nchunks + j) * chunk_size + offs
    dt = tl.load(dt_out_ptr + chunk, mask=valid, other=0.0)
    ddt = tl.load(ddt_chunk_ptr + chunk, mask=valid, other=0.0)
    ddt_state = tl.load(ddt_state_ptr + chunk, mask=valid, other=0.0)
    position = (b * seqlen + start + offs) * nheads + h
    # The chunk state weighs position s by exp(cs_last - cs_s): -term_s to d(cs_s), +term_s to
    # d(cs_last), term_s = dt_s x_s . (state part of d(x_s)); the state passing adds its own
    # d(cs_last) through the decay exp(cs_last).
    term = dt * ddt_state
    dcs = tl.where(valid, tl.load(dcs_ptr + chunk, mask=valid, other=0.0) - term, 0.0)
    dlast = tl.sum(term, axis=0) + tl.load(dlast_ptr + (b * nheads + h) * nchunks + j)
    # d(a_u) = sum_{t >= u} d(cs_t), plus d(cs_last) which every valid u feeds.
    da = tl.sum(dcs, axis=0) - tl.cumsum(dcs, axis=0) + dcs + dlast
    A = tl.load(A_ptr + h).to(tl.float32)
    dvalue = ddt + da * A
    tl.store(dA_part_ptr + (b * nheads + h) * nchunks + j, tl.sum(tl.where(valid, da * dt, 0.0), axis=0))
    raw = tl.load(
        dt_ptr + b * stride_dt_b + (start + offs).to(tl.int64) * stride_dt_l + h * stride_dt_h,
        mask=valid,
        other=0.0,
    ).to(tl.float32)
    biased, unclamped, _ = _processed_dt(raw, h, bias_ptr, lo, hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    if HAS_LIMIT:
        dvalue = tl.where((unclamped >= lo) & (unclamped <= hi), dvalue, 0.0)
    if SOFTPLUS:
        e = tl.exp(tl.minimum(biased, 20.0))
        dvalue = tl.where(biased > 20.0, dvalue, dvalue * e / (1.0 + e))
    tl.store(ddt_ptr + position, dvalue, mask=valid)


def _limit(dt_limit: tuple[float, float]) -> tuple[bool, float, float]:
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    # mamba_ssm clamps only when a limit other than (0, inf) is asked for; without softplus a
    # negative dt must pass through unchanged.
    has_limit = not (lo == 0.0 and math.isinf(hi) and hi > 0)
    return has_limit, lo, hi


def chunk_cumsum_fwd(
    dt: torch.Tensor,
    A: torch.Tensor,
    dt_bias: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """dt: (batch, seqlen, nheads)   A: (nheads,)   dt_bias: None or (nheads,)
    Returns dt processed and cs = cumsum(dt * A), each (batch, nheads, nchunks, chunk_size) fp32."""
    batch, _, nheads = dt.shape
    has_limit, lo, hi = _limit(dt_limit)
    dt_out = torch.empty(batch, nheads, table.nchunks, chunk_size, device=dt.device, dtype=torch.float32)
    cs = torch.empty_like(dt_out)
    _cumsum_fwd_kernel[(table.nchunks, nheads, batch)](
        dt,
        A,
        dt_bias if dt_bias is not None else A,
        table.starts,
        table.ends,
        dt_out,
        cs,
        chunk_size,
        table.nchunks,
        nheads,
        lo,
        hi,
        dt.stride(0),
        dt.stride(1),
        dt.stride(2),
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus,
        HAS_LIMIT=has_limit,
        BLOCK_Q=next_pow2(chunk_size),
        num_warps=4,
    )
    return dt_out, cs


def chunk_cumsum_bwd(
    dt: torch.Tensor,
    A: torch.Tensor,
    dt_bias: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dt_out: torch.Tensor,
    dcs: torch.Tensor,
    ddt_chunk: torch.Tensor,
    ddt_state: torch.Tensor,
    dlast: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dt_out, dcs, ddt_chunk, ddt_state: (batch, nheads, nchunks, chunk_size) fp32: processed dt;
    d(cs) through the chunk outputs (bmm_bwd and chunk_state_bwd); x . d(x-path) and its state part
    (chunk_scan_bwd)   dlast: (batch, nheads, nchunks) fp32, d(cs_last) from the state passing.
    Returns d(dt) (batch, seqlen, nheads) fp32 and dA (nheads,) fp32."""
    batch, seqlen, nheads = dt.shape
    has_limit, lo, hi = _limit(dt_limit)
    ddt = torch.zeros(batch, seqlen, nheads, device=dt.device, dtype=torch.float32)
    dA_part = torch.empty(batch, nheads, table.nchunks, device=dt.device, dtype=torch.float32)
    _cumsum_bwd_kernel[(table.nchunks, nheads, batch)](
        dt,
        A,
        dt_bias if dt_bias is not None else A,
        table.starts,
        table.ends,
        dt_out,
        dcs,
        ddt_chunk,
        ddt_state,
        dlast,
        ddt,
        dA_part,
        chunk_size,
        table.nchunks,
        nheads,
        seqlen,
        lo,
        hi,
        dt.stride(0),
        dt.stride(1),
        dt.stride(2),
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus,
        HAS_LIMIT=has_limit,
        BLOCK_Q=next_pow2(chunk_size),
        num_warps=4,
    )
    return ddt, dA_part.sum(dim=(0, 2))
