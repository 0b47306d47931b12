"""Stage 3: pass the state from chunk to chunk (sequential over chunks, parallel over state entries).

S_in_0 = initial state (or 0); S_out_j = exp(cs_last_j) S_in_j + S_local_j; S_in_{j+1} = S_out_j.
With seq_idx the carried term is dropped when the segment changes between the ends of two chunks.
With packed sequences a chunk that starts a sequence takes that sequence's initial state, and the
state after a sequence's last chunk is written out as its varlen state.

The forward overwrites the local states in place with S_in_j (the state entering each chunk), the
only O(seqlen * headdim * dstate / chunk_size) tensor the backward keeps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.ssd.triton.varlen import ChunkTable


def _block(device: torch.device) -> tuple[int, int]:
    """(entries per program, warps): small blocks on a GPU so that even one sequence of many chunks
    spreads over enough programs; one big block on the CPU interpreter (fewer programs to run)."""
    return (256, 2) if device.type == "cuda" else (1024, 4)


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr,
    cs_ptr,
    init_ptr,
    seq_ptr,
    ends_ptr,
    source_ptr,
    last_of_ptr,
    final_ptr,
    varlen_ptr,
    chunk_size,
    nchunks,
    nheads,
    dim,
    stride_seq_b,
    stride_seq_l,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < dim
    state = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_INIT and not VARLEN:
        state = tl.load(init_ptr + (b * nheads + h) * dim + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_SEQ:
        prev_seq = tl.load(seq_ptr + b * stride_seq_b)
    # The loads of chunk j + 1 do not depend on the running state: issue them before chunk j's
    # arithmetic and store so that their latency overlaps (the loop is latency bound when there
    # are many chunks and few programs).
    local_next = tl.load(states_ptr + (b * nchunks * nheads + h) * dim + offs, mask=inside, other=0.0)
    cs_next = tl.load(cs_ptr + (b * nheads + h) * nchunks * chunk_size + chunk_size - 1)
    for j in range(nchunks):
        slot = states_ptr + ((b * nchunks + j) * nheads + h) * dim + offs
        local = local_next
        decay = tl.exp(cs_next)
        more = j + 1 < nchunks
        local_next = tl.load(slot + nheads * dim, mask=inside & (offs * 0 + j + 1 < nchunks), other=0.0)
        cs_next = tl.load(
            cs_ptr + ((b * nheads + h) * nchunks + j + 1) * chunk_size + chunk_size - 1, mask=more, other=0.0
        )
        if VARLEN:
            source = tl.load(source_ptr + j)
            fresh = tl.zeros((BLOCK,), dtype=tl.float32)
            if HAS_INIT:
                fresh = tl.load(
                    init_ptr + (source.to(tl.int64) * nheads + h) * dim + offs,
                    mask=inside & (offs * 0 + source >= 0),
                    other=0.0,
                ).to(tl.float32)
            state = tl.where(source >= 0, fresh, state)
        tl.store(slot, state, mask=inside)
        if HAS_SEQ:
            seq_last = tl.load(seq_ptr + b * stride_seq_b + (tl.load(ends_ptr + j) - 1) * stride_seq_l)
            decay = tl.where(seq_last == prev_seq, decay, 0.0)
            prev_seq = seq_last
        state = decay * state + local
        if VARLEN:
            seq_ended = tl.load(last_of_ptr + j)
            tl.store(
                varlen_ptr + (seq_ended.to(tl.int64) * nheads + h) * dim + offs,
                state,
                mask=inside & (offs * 0 + seq_ended >= 0),
            )
    tl.store(final_ptr + (b * nheads + h) * dim + offs, state, mask=inside)


@triton.jit
def _state_passing_bwd_kernel(
    dstates_ptr,
    states_ptr,
    cs_ptr,
    seq_ptr,
    starts_ptr,
    ends_ptr,
    source_ptr,
    last_of_ptr,
    dfinal_ptr,
    dvarlen_ptr,
    dinit_ptr,
    dlast_ptr,
    chunk_size,
    nchunks,
    nheads,
    dim,
    stride_seq_b,
    stride_seq_l,
    HAS_DFINAL: tl.constexpr,
    HAS_DVARLEN: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < dim
    # grad holds d(S_out_j) while walking the chunks backwards.
    grad = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + (b * nheads + h) * dim + offs, mask=inside, other=0.0).to(tl.float32)
    # As in the forward, chunk j - 1's loads are issued before chunk j's arithmetic and stores.
    last = ((b * nchunks + nchunks - 1) * nheads + h) * dim + offs
    from_y_next = tl.load(dstates_ptr + last, mask=inside, other=0.0)
    state_in_next = tl.load(states_ptr + last, mask=inside, other=0.0)
    cs_next = tl.load(cs_ptr + ((b * nheads + h) * nchunks + nchunks - 1) * chunk_size + chunk_size - 1)
    for step in range(nchunks):
        j = nchunks - 1 - step
        if VARLEN and HAS_DVARLEN:
            seq_ended = tl.load(last_of_ptr + j)
            grad += tl.load(
                dvarlen_ptr + (seq_ended.to(tl.int64) * nheads + h) * dim + offs,
                mask=inside & (offs * 0 + seq_ended >= 0),
                other=0.0,
            ).to(tl.float32)
        here = ((b * nchunks + j) * nheads + h) * dim + offs
        from_y = from_y_next
        state_in = state_in_next
        decay = tl.exp(cs_next)
        earlier = inside & (offs * 0 + j > 0)
        from_y_next = tl.load(dstates_ptr + here - nheads * dim, mask=earlier, other=0.0)
        state_in_next = tl.load(states_ptr + here - nheads * dim, mask=earlier, other=0.0)
        cs_next = tl.load(
            cs_ptr + ((b * nheads + h) * nchunks + j - 1) * chunk_size + chunk_size - 1, mask=j > 0, other=0.0
        )
        tl.store(dstates_ptr + here, grad, mask=inside)
        if HAS_SEQ:
            seq_last = tl.load(seq_ptr + b * stride_seq_b + (tl.load(ends_ptr + j) - 1) * stride_seq_l)
            prev = tl.maximum(tl.load(starts_ptr + j) - 1, 0)
            seq_prev = tl.load(seq_ptr + b * stride_seq_b + prev * stride_seq_l)
            decay = tl.where(seq_last == seq_prev, decay, 0.0)
        # d(cs_last_j) through the decay factor; partial sum of this block of state entries.
        nblocks = tl.num_programs(0)
        tl.store(
            dlast_ptr + ((b * nheads + h) * nchunks + j) * nblocks + pid,
            decay * tl.sum(grad * state_in, axis=0),
        )
        total = from_y + decay * grad
        if VARLEN:
            source = tl.load(source_ptr + j)
            if HAS_INIT:
                tl.store(
                    dinit_ptr + (source.to(tl.int64) * nheads + h) * dim + offs,
                    total,
                    mask=inside & (offs * 0 + source >= 0),
                )
            grad = tl.where(source >= 0, 0.0, total)
        else:
            grad = total
    if HAS_INIT and not VARLEN:
        tl.store(dinit_ptr + (b * nheads + h) * dim + offs, grad, mask=inside)


def state_passing_fwd(
    states: torch.Tensor,
    cs: torch.Tensor,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    num_seqs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """states: (batch, nchunks, nheads, headdim, dstate) fp32 local chunk states, overwritten with
    the states entering each chunk   cs: (batch, nheads, nchunks, chunk_size) fp32
    initial_states: None, (batch, nheads, headdim, dstate) or, packed, (num_seqs, ...) fp32.
    Returns (states entering each chunk, final states (batch, nheads, headdim, dstate) fp32,
    varlen states (num_seqs, nheads, headdim, dstate) fp32 or None)."""
    batch, _, nheads, headdim, dstate = states.shape
    dim = headdim * dstate
    final = torch.empty(batch, nheads, headdim, dstate, device=states.device, dtype=torch.float32)
    varlen = None
    if table.varlen:
        varlen = torch.empty(num_seqs, nheads, headdim, dstate, device=states.device, dtype=torch.float32)
    has_seq = seq_idx is not None and not table.varlen
    block, warps = _block(states.device)
    _state_passing_fwd_kernel[(triton.cdiv(dim, block), batch * nheads)](
        states,
        cs,
        initial_states if initial_states is not None else states,
        seq_idx if has_seq else table.ends,
        table.ends,
        table.source,
        table.last_of,
        final,
        varlen if varlen is not None else final,
        chunk_size,
        table.nchunks,
        nheads,
        dim,
        *(seq_idx.stride() if has_seq else (0, 0)),
        HAS_INIT=initial_states is not None,
        HAS_SEQ=has_seq,
        VARLEN=table.varlen,
        BLOCK=block,
        num_warps=warps,
    )
    return states, final, varlen


def state_passing_bwd(
    dstates: torch.Tensor,
    states: torch.Tensor,
    cs: torch.Tensor,
    seq_idx: torch.Tensor | None,
    table: ChunkTable,
    chunk_size: int,
    dfinal: torch.Tensor | None,
    dvarlen: torch.Tensor | None,
    init_shape: tuple[int, ...] | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """dstates: (batch, nchunks, nheads, headdim, dstate) fp32, d(S_in_j) through the outputs of chunk
    j; overwritten with d(S_out_j), the gradient of the state leaving chunk j
    states: the states entering each chunk, as saved by the forward
    dfinal: None or (batch, nheads, headdim, dstate)   dvarlen: None or (num_seqs, nheads, headdim,
    dstate)   init_shape: the initial states' shape when they were given.
    Returns (d(S_out), d(initial_states) fp32 or None, d(cs_last) (batch, nheads, nchunks) fp32)."""
    batch, _, nheads, headdim, dstate = dstates.shape
    dim = headdim * dstate
    block, warps = _block(dstates.device)
    nblocks = triton.cdiv(dim, block)
    dinit = None
    if init_shape is not None:
        dinit = torch.zeros(init_shape, device=dstates.device, dtype=torch.float32)
    dlast = torch.empty(batch, nheads, table.nchunks, nblocks, device=dstates.device, dtype=torch.float32)
    has_seq = seq_idx is not None and not table.varlen
    dfinal = dfinal.contiguous() if dfinal is not None else None
    dvarlen = dvarlen.contiguous() if dvarlen is not None else None
    _state_passing_bwd_kernel[(nblocks, batch * nheads)](
        dstates,
        states,
        cs,
        seq_idx if has_seq else table.ends,
        table.starts,
        table.ends,
        table.source,
        table.last_of,
        dfinal if dfinal is not None else dstates,
        dvarlen if dvarlen is not None else dstates,
        dinit if dinit is not None else dstates,
        dlast,
        chunk_size,
        table.nchunks,
        nheads,
        dim,
        *(seq_idx.stride() if has_seq else (0, 0)),
        HAS_DFINAL=dfinal is not None,
        HAS_DVARLEN=dvarlen is not None and table.varlen,
        HAS_INIT=dinit is not None,
        HAS_SEQ=has_seq,
        VARLEN=table.varlen,
        BLOCK=block,
        num_warps=warps,
    )
    return dstates, dinit, dlast.sum(dim=-1)
