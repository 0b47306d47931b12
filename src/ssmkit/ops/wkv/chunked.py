"""The WKV recurrence in chunked matrix form, in plain PyTorch (no loop over time steps).

The sequence is cut into chunks of Q steps; positions t, s below are 0-based inside a chunk
(the padded tail of the last chunk adds neither steps nor keys). The output at position t has
three parts:

1. intra-chunk: ``sum_{s<t} exp(-w (t - 1 - s)) (r_t . k_s) v_s`` — a masked (Q x Q) matmul;
2. bonus: ``(r_t . (u * k_t)) v_t`` for the current token;
3. inter-chunk: ``exp(-w t) r_t @ H_{c-1}``, H_{c-1} the state entering the chunk.

The state each chunk builds from zero is ``sum_s exp(-w (Q - 1 - s)) k_s^T v_s`` and the states
are carried across chunks by :func:`ssmkit.ops.common.state_passing` (a loop over chunks).

Stability: every exponent above is -w times a count of steps >= 0, so ``exp`` never overflows.
The factorised form ``exp(-w t) * exp(w s)`` would turn the (Q x Q) decay matrix into a cheap
outer product, but ``exp(w s)`` overflows fp32 as soon as ``w * Q > 88`` (w = 5, Q = 32).

Sequence boundaries (``seq_idx``) are masks: a position only sees keys of its own segment, and
the state stops flowing into a chunk whose entering state belongs to an earlier segment.
Gradients come from autograd (only the loop over chunks has its backward written out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.common import compute_dtype, pad_to_chunks, segment_ids, state_passing


def wkv_chunked(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked WKV; arguments and returns as :func:`ssmkit.ops.wkv.reference.wkv_reference`.

    r, k: (batch, seqlen, nheads, dk)   v: (batch, seqlen, nheads, dv)   w: (nheads,)
    u: (nheads, dk)   initial_state: (batch, nheads, dk, dv)   seq_idx: (batch, seqlen) int
    Returns ``(y, final_state)``: y (batch, seqlen, nheads, dv) in r's dtype; final_state
    (batch, nheads, dk, dv) in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    batch, seqlen, nheads, _ = r.shape
    dv = v.shape[-1]
    dtype = compute_dtype(r.dtype)
    Q = max(1, min(chunk_size, seqlen))  # a chunk longer than the sequence would only add padding
    nchunks = -(-seqlen // Q)
    # The decay over a stretch of steps is exp(-w * number of steps). Counting the steps in
    # integers (exact in floating point) and multiplying by w once keeps every exponent exact up to
    # one rounding; differences of cumulative log-decays (-w * t) would lose digits as t grows.
    real = pad_to_chunks(torch.ones(1, seqlen, dtype=dtype, device=r.device), Q)[0]  # (nchunks, Q)
    steps = real.cumsum(-1)  # steps up to and including each position; padding adds none
    steps_excl = steps - real  # steps strictly before each position
    neg_w = -w.to(dtype)[None, :, None]  # (1, nheads, 1)

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (batch, seqlen, nheads, d) -> (b, nc, h, Q, d)
        return pad_to_chunks(t.to(dtype), Q).transpose(2, 3)

    rc, kc, vc = chunks(r), chunks(k), chunks(v)

    causal = torch.ones(Q, Q, dtype=torch.bool, device=r.device).tril(-1)  # strictly s < t
    mask_intra, mask_end, mask_prev, keep = causal, None, None, None
    if seq_idx is not None:
        seg = pad_to_chunks(segment_ids(seq_idx), Q, replicate=True)  # (batch, nchunks, Q)
        seg_end = seg[..., -1]
        # The segment of the state entering each chunk; chunk 0 receives the initial state, which
        # belongs to the first segment (id 0).
        seg_prev = F.pad(seg_end[:, :-1], (1, 0), value=0)
        mask_intra = (causal & (seg[..., :, None] == seg[..., None, :]))[:, :, None]
        mask_end = (seg == seg_end[..., None])[:, :, None]  # inputs that reach the chunk's end
        mask_prev = (seg == seg_prev[..., None])[:, :, None]  # positions that see the entering state
        keep = seg_end == seg_prev

    # 1. intra-chunk, and 2. the bonus of the current token. Key s reaches query t after the
    # t - 1 - s decays of the steps between them (>= 0 where unmasked).
    gap = (steps_excl[:, :, None] - steps[:, None, :])[:, None]  # (nchunks, 1, Q, Q)
    decay = (neg_w[..., None] * gap).masked_fill(~mask_intra, -torch.inf).exp()
    y = ((rc @ kc.transpose(-1, -2)) * decay) @ vc
    y = y + ((rc * u.to(dtype)[:, None, :]) * kc).sum(-1, keepdim=True) * vc

    # Chunk states from zero, then the states entering every chunk.
    decay_to_end = torch.exp(neg_w * (steps[:, -1:] - steps)[:, None])  # (nchunks, nheads, Q)
    if mask_end is not None:
        decay_to_end = decay_to_end * mask_end
    states = (kc * decay_to_end[..., None]).transpose(-1, -2) @ vc  # (b, nc, h, dk, dv)
    chunk_decay = torch.exp(neg_w[..., 0] * steps[:, -1:]).expand(batch, nchunks, nheads)
    entering, final_state = state_passing(states, chunk_decay, initial_state, keep)

    # 3. inter-chunk.
    decay_from_start = torch.exp(neg_w * steps_excl[:, None])  # (nchunks, nheads, Q)
    if mask_prev is not None:
        decay_from_start = decay_from_start * mask_prev
    y = y + (rc * decay_from_start[..., None]) @ entering

    y = y.transpose(2, 3).reshape(batch, nchunks * Q, nheads, dv)[:, :seqlen]
    return y.to(r.dtype), final_state
