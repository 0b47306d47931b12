"""Sequential reference for the Mamba-1 selective scan: one loop step per time step.

This is the ground truth the fast paths are tested against. It follows the recurrence of the
Mamba paper (Gu & Dao, 2023, Algorithm 2) literally, in fp32 for half-precision inputs and in fp64
for fp64 inputs, so that gradients taken through it by autograd in fp64 are exact to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-1 selective scan, one time step at a time.

    u, delta: (batch, dim, seqlen)       A: (dim, dstate)
    B, C: (batch, ngroups, dstate, seqlen); channel d reads group d // (dim // ngroups)
    D, delta_bias: (dim,)                z: (batch, dim, seqlen)
    initial_state: (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens
    cu_seqlens: (num_seqs + 1,) integer boundaries of packed sequences (then batch == 1)

    For every channel d and state index n::

        delta_t = softplus(delta_t + delta_bias)        (bias and softplus optional)
        h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
        y_t     = sum_n C_t * h_t + D * u_t
        out_t   = y_t * silu(z_t)                       (if z is given)

    With cu_seqlens the state restarts (from initial_state[i], or zero) at the first position of
    each packed sequence i. Arguments are assumed valid (the public function checks them).

    Returns out: (batch, dim, seqlen) in the dtype of u, and last_state (batch, dim, dstate)
    (one row per sequence with cu_seqlens) in the compute dtype (fp32, or fp64 for fp64 inputs)
    when return_last_state, else None.
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, seqlen = u.shape
    ngroups, dstate = B.shape[1], B.shape[2]

    u_c, delta_c, A_c = u.to(compute), delta.to(compute), A.to(compute)
    B_c, C_c = B.to(compute), C.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)

    # Which sequence starts at each position (packed batches restart the state there).
    starts: dict[int, int] = {}
    if cu_seqlens is not None:
        bounds = [int(v) for v in cu_seqlens.tolist()]
        for i in range(len(bounds) - 1):
            if bounds[i + 1] > bounds[i]:
                starts[bounds[i]] = i
    num_states = len(cu_seqlens) - 1 if cu_seqlens is not None else batch

    def start_state(i: int) -> torch.Tensor:
        if initial_state is None:
            return u_c.new_zeros(batch, dim, dstate)
        # Packed: sequence i's state lives in row i; the batch dimension (size 1) is added back.
        return initial_state[i : i + 1].to(compute) if cu_seqlens is not None else initial_state.to(compute)

    h = start_state(0)
    last_states: list[torch.Tensor | None] = [None] * num_states
    current = 0
    ys = []
    for t in range(seqlen):
        if t in starts:
            if t > 0:
                last_states[current] = h
            current = starts[t]
            h = start_state(current)
        # Every channel reads its group's B_t and C_t: (batch, dim, dstate).
        B_t = B_c[:, :, :, t].repeat_interleave(dim // ngroups, dim=1)
        C_t = C_c[:, :, :, t].repeat_interleave(dim // ngroups, dim=1)
        decay = torch.exp(delta_c[:, :, t, None] * A_c)  # (batch, dim, dstate)
        h = decay * h + (delta_c[:, :, t] * u_c[:, :, t])[:, :, None] * B_t
        ys.append((h * C_t).sum(dim=-1))
    last_states[current] = h

    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    if not return_last_state:
        return out, None
    if cu_seqlens is None:
        return out, h
    # Empty sequences never ran: their final state is their initial state (or zero).
    filled = [s if s is not None else start_state(i) for i, s in enumerate(last_states)]
    return out, torch.cat(filled, dim=0)
