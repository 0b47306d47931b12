"""The WKV recurrence as a plain loop over time: the ground truth for the chunked path.

Per batch row, head h and step t (the state restarts from zero wherever ``seq_idx`` changes)::

    y_t = r_t @ S_{t-1} + (r_t . (u_h * k_t)) v_t
    S_t = exp(-w_h) S_{t-1} + k_t^T v_t

Slow (a Python loop over seqlen) and meant to be: keep it readable.
"""

from __future__ import annotations

import torch

from ssmkit.ops.common import compute_dtype


def wkv_reference(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential WKV; arguments as :func:`ssmkit.ops.wkv.wkv`, already checked.

    r, k: (batch, seqlen, nheads, dk)   v: (batch, seqlen, nheads, dv)   w: (nheads,)
    u: (nheads, dk)   initial_state: (batch, nheads, dk, dv)   seq_idx: (batch, seqlen) int
    ``chunk_size`` is ignored: there are no chunks here.
    Returns ``(y, final_state)``: y (batch, seqlen, nheads, dv) in r's dtype; final_state
    (batch, nheads, dk, dv) in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    batch, seqlen, nheads, dk = r.shape
    dv = v.shape[-1]
    out_dtype, dtype = r.dtype, compute_dtype(r.dtype)
    r, k, v = r.to(dtype), k.to(dtype), v.to(dtype)
    decay = torch.exp(-w.to(dtype))[None, :, None, None]  # (1, nheads, 1, 1)
    u = u.to(dtype)
    if initial_state is None:
        state = r.new_zeros(batch, nheads, dk, dv)
    else:
        state = initial_state.to(dtype)
    ys = []
    for t in range(seqlen):
        if t > 0 and seq_idx is not None:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype)  # (batch,)
            state = state * keep[:, None, None, None]
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (batch, nheads, dk, dv)
        y = torch.einsum("bhk,bhkv->bhv", r[:, t], state + u[None, :, :, None] * kv)
        ys.append(y)
        state = decay * state + kv
    return torch.stack(ys, dim=1).to(out_dtype), state
