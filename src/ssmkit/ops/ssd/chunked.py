"""Mamba-2 SSD in the chunked matrix form (the SSD paper's four steps), in plain PyTorch.

The sequence is cut into chunks of Q steps. Inside a chunk the scan is a masked, attention-like
matmul; across chunks only one state per chunk travels:

1. diagonal blocks: ``y_diag = (C B^T * exp(segsum(dA))) @ (dt * x)`` per chunk;
2. chunk states: the state each chunk builds from zero, ``(dt * x * decay to chunk end)^T @ B``;
3. state passing: ``H_c = exp(sum dA over chunk c) * H_{c-1} + S_c``, a loop over chunks;
4. off-diagonal blocks: ``y_off = exp(cumsum dA) * (C @ H_{c-1}^T)``.

Sequence boundaries (``seq_idx`` / ``cu_seqlens``) are masks on the decays, never a loop over
sequences; initial states enter as "events" at the position where their sequence starts.
This is the CPU fast path. Gradients come from autograd through it; only the loop over chunks
(:func:`ssmkit.ops.common.state_passing`) has its backward written out. Layouts are chosen so
that every matmul is a batched GEMM over (batch, chunk, group) with the heads of a group folded
into the GEMM's M or N dimension, which keeps BLAS busy and never repeats B or C per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssmkit.ops.common import chunk_cumsum, pad_to_chunks, segment_ids, segsum, state_passing
from ssmkit.ops.ssd.shared import prepare_inputs, skip_and_gate


def block_size(chunk_size: int, seqlen: int, headdim: int, dstate: int) -> int:
    """The chunk length this path runs with: ``chunk_size``, capped where a shorter one is faster.

    The result does not depend on the chunk length (up to rounding), only the cost does: the
    (Q x Q) blocks cost O(seqlen * nheads * Q) memory traffic, the chunk states
    O(seqlen / Q * nheads * headdim * dstate), so Q near sqrt(headdim * dstate / 2) balances them
    (64 for headdim 64, dstate 128, measured fastest on CPU; GPU kernels prefer 256). A chunk
    longer than the sequence would only add padding.
    """
    balanced = 2 ** round(math.log2(math.sqrt(headdim * dstate / 2)))
    return max(1, min(chunk_size, seqlen, max(16, min(128, balanced))))


class _Chunks:
    """The chunked inputs and masks, shared by the steps below.

    dA, dA_cumsum: (batch, nchunks, nheads, Q)   xdt_t: (batch, nchunks, nheads, headdim, Q)
    B, C: (batch, nchunks, ngroups, Q, dstate)   seg: (batch, nchunks, Q) segment ids or None
    """

    def __init__(self, x, dt, A, B, C, seq_idx, chunk_size, dtype):
        batch, seqlen, nheads, headdim = x.shape
        self.ngroups, self.dstate = B.shape[2:]
        self.batch, self.nheads, self.headdim, self.Q = batch, nheads, headdim, chunk_size
        self.dA, self.dA_cumsum = chunk_cumsum(dt * A.to(dtype), chunk_size)
        self.nchunks = self.dA.shape[1]
        # dt * x with positions last: a contiguous (headdim x Q) block per head is both the
        # left operand of the chunk-state GEMM and, transposed, the right one of the diagonal GEMM.
        xdt = pad_to_chunks(x.to(dtype) * dt[..., None], chunk_size)
        self.xdt_t = xdt.permute(0, 1, 3, 4, 2).contiguous()
        self.B = pad_to_chunks(B.to(dtype), chunk_size).transpose(2, 3).contiguous()
        self.C = pad_to_chunks(C.to(dtype), chunk_size).transpose(2, 3).contiguous()
        self.seg = None
        if seq_idx is not None:
            self.seg = pad_to_chunks(segment_ids(seq_idx), chunk_size, replicate=True)
            self.seg_end = self.seg[..., -1]  # (batch, nchunks): segment at each chunk's end
            # The segment of the state entering chunk c; -1 (no segment) before chunk 0.
            self.seg_prev = F.pad(self.seg_end[:, :-1], (1, 0), value=-1)

    def by_group(self, t: torch.Tensor) -> torch.Tensor:
        """(..., nheads, a, b) -> (..., ngroups, heads_per_group * a, b): fold a group's heads
        into one GEMM operand (a view when t is contiguous)."""
        return t.reshape(*t.shape[:-3], self.ngroups, -1, t.shape[-1])


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    return_final_states: bool,
    return_varlen_states: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Chunked SSD; arguments, shapes and returns as :func:`ssmkit.ops.ssd.reference.ssd_reference`.

    x: (batch, seqlen, nheads, headdim); ``chunk_size`` is an upper bound on the chunk length
    (see :func:`block_size`).
    """
    batch, seqlen, nheads, headdim = x.shape
    dtype, dt, seq_idx = prepare_inputs(x, dt, dt_bias, dt_softplus, dt_limit, seq_idx, cu_seqlens)
    Q = block_size(chunk_size, seqlen, headdim, B.shape[-1])
    ch = _Chunks(x, dt, A, B, C, seq_idx, Q, dtype)

    y_diag = _diagonal_blocks(ch)
    states = _chunk_states(ch)
    events = _initial_state_events(ch, initial_states, cu_seqlens)
    if events is not None:
        states = states.flatten(0, 1).index_add(0, events.flat, events.to_chunk_end()).view_as(states)
    keep = None if ch.seg is None else ch.seg_end == ch.seg_prev
    entering, final_states = state_passing(states, ch.dA_cumsum[..., -1].exp(), keep=keep)
    y_off = _off_diagonal_blocks(ch, entering, events)

    # (batch, nchunks, nheads, Q, headdim) and (batch, nchunks, ngroups, Q, heads_per_group,
    # headdim) -> (batch, nchunks, Q, nheads, headdim), the layout of x.
    # y_off goes first: the sum takes the memory layout of its first operand, and only x's layout
    # makes the reshape below free.
    y_off = y_off.permute(0, 1, 3, 2, 4, 5).reshape(batch, ch.nchunks, Q, nheads, headdim)
    y = y_off + y_diag.transpose(2, 3)
    y = skip_and_gate(y.reshape(batch, ch.nchunks * Q, nheads, headdim)[:, :seqlen], x, D, z)

    varlen_states = None
    if return_varlen_states:
        varlen_states = _varlen_states(ch, entering, events, initial_states, cu_seqlens)
    return y.to(x.dtype), (final_states if return_final_states else None), varlen_states


def _diagonal_blocks(ch: _Chunks) -> torch.Tensor:
    """Step 1, outputs from inputs of the same chunk: (batch, nchunks, nheads, Q, headdim)."""
    same = None if ch.seg is None else (ch.seg[..., :, None] == ch.seg[..., None, :])[:, :, None]
    decay = segsum(ch.dA_cumsum, same).exp_()  # (batch, nchunks, nheads, Q, Q)
    # C B^T once per group (not per head), then broadcast over the group's heads.
    CB = ch.C @ ch.B.transpose(-1, -2)  # (batch, nchunks, ngroups, Q, Q)
    scores = decay.unflatten(2, (ch.ngroups, -1)) * CB[:, :, :, None]
    return scores.flatten(2, 3) @ ch.xdt_t.transpose(-1, -2)


def _chunk_states(ch: _Chunks) -> torch.Tensor:
    """Step 2, the state each chunk builds from zero: (batch, nchunks, nheads, headdim, dstate)."""
    decay_to_end = torch.exp(ch.dA_cumsum[..., -1:] - ch.dA_cumsum)  # (batch, nchunks, nheads, Q)
    if ch.seg is not None:  # inputs before a boundary inside the chunk do not reach its end
        decay_to_end = decay_to_end * (ch.seg == ch.seg_end[..., None])[:, :, None]
    weighted = ch.by_group(ch.xdt_t * decay_to_end[:, :, :, None, :])  # (.., ngroups, hg * headdim, Q)
    return (weighted @ ch.B).view(ch.batch, ch.nchunks, ch.nheads, ch.headdim, ch.dstate)


def _off_diagonal_blocks(ch: _Chunks, entering: torch.Tensor, events: _Events | None) -> torch.Tensor:
    """Step 4, outputs from the state entering each chunk (and from initial states that start
    inside it): (batch, nchunks, ngroups, Q, heads_per_group, headdim)."""
    # One GEMM per group: (Q x dstate) @ (dstate x hg * headdim).
    y_off = ch.C @ ch.by_group(entering).transpose(-1, -2)  # (batch, nchunks, ngroups, Q, hg * headdim)
    decay_from_start = ch.dA_cumsum.exp()  # (batch, nchunks, nheads, Q)
    if ch.seg is not None:  # positions after a boundary inside the chunk do not see the state
        decay_from_start = decay_from_start * (ch.seg == ch.seg_prev[..., None])[:, :, None]
    decay_from_start = decay_from_start.unflatten(2, (ch.ngroups, -1)).transpose(3, 4)
    y_off = y_off.unflatten(-1, (-1, ch.headdim)) * decay_from_start[..., None]
    if events is not None:
        y_off = y_off.flatten(0, 1).index_add(0, events.flat, events.to_outputs()).view_as(y_off)
    return y_off


class _Events:
    """Initial states entering at given positions: per batch row at position 0, or per packed
    sequence at its first position. Each event sits in one chunk (``flat`` indexes the flattened
    (batch * nchunks) axis) and decays from its start position on, within its own segment."""

    def __init__(self, ch: _Chunks, rows: torch.Tensor, starts: torch.Tensor, states: torch.Tensor):
        self.ch, self.states = ch, states  # states: (events, nheads, headdim, dstate)
        self.chunk, offset = starts // ch.Q, starts % ch.Q
        self.flat = rows * ch.nchunks + self.chunk
        cumsum = ch.dA_cumsum.flatten(0, 1)[self.flat]  # (events, nheads, Q)
        at_start = offset[:, None, None].expand(-1, ch.nheads, 1)
        # Sum of dA before the start inside the chunk; the event decays by sum(dA[start .. t]).
        before = cumsum.gather(-1, at_start) - ch.dA.flatten(0, 1)[self.flat].gather(-1, at_start)
        positions = torch.arange(ch.Q, device=starts.device)
        live = positions[None, :] >= offset[:, None]  # (events, Q)
        if ch.seg is not None:
            seg = ch.seg.flatten(0, 1)[self.flat]
            live = live & (seg == seg.gather(-1, offset[:, None]))
        # (events, nheads, Q): the decay of the event's state at each position of its chunk.
        self.decay = (cumsum - before).masked_fill(~live[:, None, :], -torch.inf).exp()

    def to_chunk_end(self) -> torch.Tensor:
        """Contribution to the chunk state: (events, nheads, headdim, dstate)."""
        return self.decay[..., -1, None, None] * self.states

    def to_outputs(self) -> torch.Tensor:
        """Contribution to the outputs of the chunk: (events, ngroups, Q, hg, headdim)."""
        ch = self.ch
        y = ch.C.flatten(0, 1)[self.flat] @ ch.by_group(self.states).transpose(-1, -2)
        decay = self.decay.unflatten(1, (ch.ngroups, -1)).transpose(2, 3)  # (events, ngroups, Q, hg)
        return y.unflatten(-1, (-1, ch.headdim)) * decay[..., None]


def _initial_state_events(
    ch: _Chunks, initial_states: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> _Events | None:
    if initial_states is None:
        return None
    states = initial_states.to(ch.dA.dtype)
    device = states.device
    if cu_seqlens is None:
        rows = torch.arange(ch.batch, device=device)
        return _Events(ch, rows, torch.zeros_like(rows), states)
    # An empty sequence owns no position, so its initial state reaches no output (only its
    # varlen state, handled in _varlen_states).
    nonempty = (cu_seqlens[1:] > cu_seqlens[:-1]).nonzero().squeeze(1)
    starts = cu_seqlens[:-1][nonempty].long()
    return _Events(ch, torch.zeros_like(starts), starts, states[nonempty])


def _varlen_states(
    ch: _Chunks,
    entering: torch.Tensor,
    events: _Events | None,
    initial_states: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """The state after the last step of each packed sequence: (num_seqs, nheads, headdim, dstate).

    Same three sources as an output at that step: the state entering the chunk, the inputs of
    the chunk up to the step, and an initial state that starts inside the chunk.
    """
    nonempty = (cu_seqlens[1:] > cu_seqlens[:-1]).nonzero().squeeze(1)
    last = cu_seqlens[1:][nonempty].long() - 1
    chunk, offset = last // ch.Q, last % ch.Q  # batch is 1: the chunk index is the flat index
    at_last = offset[:, None, None].expand(-1, ch.nheads, 1)
    cumsum = ch.dA_cumsum[0, chunk]  # (sequences, nheads, Q)
    cumsum_last = cumsum.gather(-1, at_last)  # (sequences, nheads, 1)
    seg = ch.seg[0, chunk]  # (sequences, Q)
    seg_last = seg.gather(-1, offset[:, None])

    from_prev = (seg_last == ch.seg_prev[0, chunk, None]).to(cumsum.dtype)  # (sequences, 1)
    state = entering[0, chunk] * (cumsum_last.exp() * from_prev[:, :, None])[..., None]
    live = (torch.arange(ch.Q, device=last.device)[None, :] <= offset[:, None]) & (seg == seg_last)
    decay_to_last = (cumsum_last - cumsum).masked_fill(~live[:, None, :], -torch.inf).exp()
    weighted = ch.by_group(ch.xdt_t[0, chunk] * decay_to_last[:, :, None, :])
    state = state + (weighted @ ch.B[0, chunk]).view_as(state)
    if events is not None:  # events are the non-empty sequences, in the same order
        same_chunk = (events.chunk == chunk).to(cumsum.dtype)[:, None]
        decay = events.decay.gather(-1, at_last).squeeze(-1) * same_chunk  # (sequences, nheads)
        state = state + decay[..., None, None] * events.states

    num_seqs = cu_seqlens.numel() - 1
    # An empty sequence takes no step: it ends in the state it started from.
    if initial_states is None:
        start = state.new_zeros(num_seqs, *state.shape[1:])
    else:
        start = initial_states.to(state.dtype)
    return start.index_copy(0, nonempty, state)
