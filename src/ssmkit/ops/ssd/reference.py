"""Mamba-2 SSD as a plain recurrence over time: the ground truth for every other backend.

For each step t, head h and the group g = h // (nheads // ngroups) that the head reads:

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T      (headdim x dstate)
    y_t     = state_t C_t + D_h * x_t,      then  y_t * silu(z_t)  when z is given

The state restarts (from zero, or from the sequence's own initial state under ``cu_seqlens``)
wherever ``seq_idx`` changes. Slow (a Python loop over seqlen) and meant to be: keep it readable.
"""

from __future__ import annotations

import torch

from ssmkit.ops.ssd.shared import prepare_inputs, skip_and_gate


def ssd_reference(
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
    """Sequential SSD; arguments as :func:`ssmkit.ops.mamba_chunk_scan_combined`, already checked.

    x: (batch, seqlen, nheads, headdim)   dt: (batch, seqlen, nheads)   A: (nheads,)
    B, C: (batch, seqlen, ngroups, dstate)   D: (nheads,) or (nheads, headdim)   z: like x
    dt_bias: (nheads,)   seq_idx: (batch, seqlen) int   cu_seqlens: (num_seqs + 1,) int
    initial_states: (batch, nheads, headdim, dstate), or (num_seqs, ...) with cu_seqlens
    ``chunk_size`` is ignored: there are no chunks here.
    Returns ``(out, final_states, varlen_states)``: out like x (x's dtype); final_states
    (batch, nheads, headdim, dstate) and varlen_states (num_seqs, nheads, headdim, dstate) in the
    compute dtype (fp32, or fp64 for fp64 inputs), or None when not asked for.
    """
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    heads_per_group = nheads // B.shape[2]
    dtype, dt, seq_idx = prepare_inputs(x, dt, dt_bias, dt_softplus, dt_limit, seq_idx, cu_seqlens)
    A, xf = A.to(dtype), x.to(dtype)
    B = B.to(dtype).repeat_interleave(heads_per_group, dim=2)  # (batch, seqlen, nheads, dstate)
    C = C.to(dtype).repeat_interleave(heads_per_group, dim=2)
    zeros = xf.new_zeros(batch, nheads, headdim, dstate)

    def start_state(t: int) -> torch.Tensor:
        """The state before step t when a sequence starts at t."""
        if initial_states is None:
            return zeros
        if cu_seqlens is not None:  # one initial state per packed sequence (batch is 1)
            return initial_states[int(seq_idx[0, t])].to(dtype)[None]
        return initial_states.to(dtype) if t == 0 else zeros

    # Under cu_seqlens, remember the state right after each non-empty sequence's last step.
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else []
    last_step_of = {bounds[s + 1] - 1: s for s in range(len(bounds) - 1) if bounds[s + 1] > bounds[s]}
    varlen: dict[int, torch.Tensor] = {}

    state, ys = start_state(0), []
    for t in range(seqlen):
        if t > 0 and seq_idx is not None:
            reset = seq_idx[:, t] != seq_idx[:, t - 1]  # (batch,)
            state = torch.where(reset[:, None, None, None], start_state(t), state)
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (batch, nheads, 1, 1)
        inject = (dt[:, t, :, None] * xf[:, t])[..., None] * B[:, t, :, None, :]
        state = decay * state + inject
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
        if t in last_step_of:
            varlen[last_step_of[t]] = state[0]
    y = skip_and_gate(torch.stack(ys, dim=1), x, D, z)  # (batch, seqlen, nheads, headdim)

    varlen_states = None
    if return_varlen_states:

        def end_state(s: int) -> torch.Tensor:
            if s in varlen:
                return varlen[s]
            # An empty sequence takes no step: it ends in the state it started from.
            return zeros[0] if initial_states is None else initial_states[s].to(dtype)

        varlen_states = torch.stack([end_state(s) for s in range(len(bounds) - 1)])
    return y.to(x.dtype), (state if return_final_states else None), varlen_states
