"""Chunking a sequence, chunk cumulative sums and segment sums (the SSD paper's "segsum").

Layout: chunked tensors put the chunk index right after batch, ``(batch, nchunks, ...)``, so a
sequence reshapes into chunks without copying; per-head quantities that the chunked matmuls
broadcast over positions are kept as ``(batch, nchunks, nheads, chunk_size)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_chunks(t: torch.Tensor, chunk_size: int, *, replicate: bool = False) -> torch.Tensor:
    """Split dim 1 (the sequence) into chunks, padding the last chunk.

    t: (batch, seqlen, *rest)
    Returns (batch, nchunks, chunk_size, *rest) with nchunks = ceil(seqlen / chunk_size).

    Zero padding (the default) is what the scan wants for x, dt, B and C: a step with dt = 0
    neither decays the state nor adds to it, so padded steps leave every state unchanged.
    ``replicate`` repeats the last position instead (for segment ids: padding stays in the last
    sequence and does not look like a reset).
    """
    batch, seqlen = t.shape[:2]
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen
    if pad:
        if replicate:
            tail = t[:, -1:].expand(batch, pad, *t.shape[2:])
            t = torch.cat([t, tail], dim=1)
        else:
            # F.pad counts dims from the last one backwards: pad only the sequence dim (dim 1).
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])


def chunk_cumsum(dA: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative sums of the log-decays ``dA = dt * A`` inside each chunk.

    dA: (batch, seqlen, nheads)
    Returns ``(dA_chunks, dA_cumsum)``, both (batch, nchunks, nheads, chunk_size); the padded tail
    holds zeros, so the cumsum stays flat there.
    """
    dA_chunks = pad_to_chunks(dA, chunk_size).transpose(2, 3)
    return dA_chunks, dA_chunks.cumsum(dim=-1)


def segsum(dA_cumsum: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Segment sums inside a chunk: ``out[..., t, s] = sum(dA[s+1 .. t])`` for s <= t, else -inf.

    dA_cumsum: (..., chunk_size), the output of :func:`chunk_cumsum`.
    mask: optional bool, broadcastable to (..., chunk_size, chunk_size): False also gives -inf
    (e.g. across a sequence boundary), so ``exp(segsum(...))`` is the decay matrix with zeros.
    Returns (..., chunk_size, chunk_size).

    A difference of two cumsums inside one chunk is accurate enough (the cumsums are short); the
    factorized form ``exp(cs_t) * exp(-cs_s)`` is not, as exp(-cs_s) overflows on long chunks.
    """
    size = dA_cumsum.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=dA_cumsum.device).tril()
    keep = causal if mask is None else causal & mask
    diff = dA_cumsum[..., :, None] - dA_cumsum[..., None, :]
    # In place: the subtraction's backward needs neither its output nor its inputs.
    return diff.masked_fill_(~keep, -torch.inf)
