"""Chunk layout of a (possibly packed) sequence, built on the device without host synchronisation.

Without ``cu_seqlens`` chunk ``j`` covers positions ``[j * chunk_size, min((j + 1) * chunk_size,
seqlen))``. With ``cu_seqlens`` every packed sequence is cut into its own chunks ("logical
chunks"), so no chunk straddles two sequences: a chunk that starts a sequence takes that sequence's
initial state instead of the previous chunk's state, and the state after a sequence's last chunk is
its varlen state. The number of logical chunks depends on the data; the grids use the bound
``ceil(seqlen / chunk_size) + num_seqs`` and the chunks past the real ones are empty (start = end),
which decay by exp(0) = 1 and add nothing, so they carry the last state unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkTable:
    """starts, ends: (nchunks,) int32 position range of each chunk (end exclusive).
    source: (nchunks,) int32, the packed sequence whose initial state a chunk starts from, or -1
    when it continues the previous chunk. last_of: (nchunks,) int32, the packed sequence a chunk
    ends, or -1 (empty sequences own no chunk). ``varlen`` tells the kernels whether ``source`` and
    ``last_of`` are meaningful."""

    starts: torch.Tensor
    ends: torch.Tensor
    source: torch.Tensor
    last_of: torch.Tensor
    nchunks: int
    varlen: bool
    empty: torch.Tensor | None = None  # (num_seqs,) bool: packed sequences of length 0


def num_chunks(seqlen: int, chunk_size: int, num_seqs: int | None) -> int:
    """Chunks the kernels run over (an upper bound when sequences are packed)."""
    regular = -(-seqlen // chunk_size)
    return regular if num_seqs is None else regular + num_seqs


def chunk_table(
    seqlen: int, chunk_size: int, cu_seqlens: torch.Tensor | None, device: torch.device
) -> ChunkTable:
    """cu_seqlens: None or (num_seqs + 1,) int boundaries of the packed sequences."""
    if cu_seqlens is None:
        nchunks = num_chunks(seqlen, chunk_size, None)
        starts = torch.arange(nchunks, device=device, dtype=torch.int64) * chunk_size
        ends = torch.clamp(starts + chunk_size, max=seqlen)
        unused = torch.full((nchunks,), -1, device=device, dtype=torch.int32)
        return ChunkTable(starts.int(), ends.int(), unused, unused, nchunks, False)

    num_seqs = cu_seqlens.numel() - 1
    nchunks = num_chunks(seqlen, chunk_size, num_seqs)
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    # An empty sequence gets no chunk: it must not interrupt the running state (the final state is
    # the state after the last position); its varlen state is patched in by the caller.
    per_seq = (lengths + chunk_size - 1) // chunk_size
    first = torch.cumsum(per_seq, 0) - per_seq
    index = torch.arange(nchunks, device=device, dtype=torch.int64)
    # right=True: among sequences sharing a first chunk (empty ones before a non-empty one) pick the
    # last, the one that owns the chunk.
    seq = torch.searchsorted(first, index, right=True) - 1
    local = index - first[seq]
    real = local < per_seq[seq]
    starts = bounds[seq] + local * chunk_size
    ends = torch.minimum(starts + chunk_size, bounds[seq + 1])
    starts = torch.where(real, starts, torch.full_like(starts, seqlen))
    ends = torch.where(real, ends, torch.full_like(ends, seqlen))
    minus_one = torch.full_like(seq, -1)
    source = torch.where(real & (local == 0), seq, minus_one)
    last_of = torch.where(real & (local == per_seq[seq] - 1), seq, minus_one)
    return ChunkTable(starts.int(), ends.int(), source.int(), last_of.int(), nchunks, True, lengths == 0)
