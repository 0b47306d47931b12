"""Packed variable-length batches: sequence ids per position and reset-counting segment ids."""

from __future__ import annotations

import torch


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The index of the packed sequence each position belongs to (flash-attn convention).

    cu_seqlens: (num_seqs + 1,) non-decreasing boundaries from 0 to ``seqlen``.
    Returns seq_idx: (1, seqlen) int32. Empty sequences own no position, so their index is skipped.
    """
    positions = torch.arange(seqlen, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # Position t belongs to the sequence s with cu_seqlens[s] <= t < cu_seqlens[s + 1], i.e. to the
    # number of sequence ends at or before t.
    seq_idx = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return seq_idx.to(torch.int32).unsqueeze(0)


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Count the resets: 0 at position 0, incremented wherever ``seq_idx`` changes.

    seq_idx: (batch, seqlen) integer.   Returns (batch, seqlen) int64, non-decreasing per row.

    Positions t and s (s <= t) share a state history iff their segment ids are equal; unlike raw
    ``seq_idx`` values the ids start at 0, so -1 is free to mean "before the sequence".
    """
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return torch.nn.functional.pad(changes.cumsum(dim=1), (1, 0))
