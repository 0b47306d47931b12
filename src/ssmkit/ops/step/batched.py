"""PyTorch fast path for the decode step: the whole batch and all heads in a few tensor ops.

Same canonical layout and semantics as ``reference.py``. Groups are broadcast to their heads by
``repeat_interleave`` on B and C, which are (batch, ngroups, dstate) and tiny next to the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.step.reference import compute_dtype


def selective_state_update_batched(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    A_is_log: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step, out of place.

    state: (batch, nheads, headdim, dstate)   x, dt, z: (batch, nheads, headdim)
    A: (nheads, headdim, dstate)   B, C: (batch, ngroups, dstate)   D, dt_bias: (nheads, headdim)
    A_is_log: A holds A_log and the step uses A = -exp(A_log).
    Returns y: (batch, nheads, headdim) in x's dtype and the new state (shape and dtype of state).
    """
    nheads = x.shape[1]
    heads_per_group = nheads // B.shape[1]
    dtype = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    step = dt.to(dtype)
    if dt_bias is not None:
        step = step + dt_bias.to(dtype)
    if dt_softplus:
        step = F.softplus(step)
    x_c = x.to(dtype)
    B_heads = B.to(dtype).repeat_interleave(heads_per_group, dim=1).unsqueeze(2)  # (batch, nheads, 1, dstate)
    C_heads = (
        C.to(dtype).repeat_interleave(heads_per_group, dim=1).unsqueeze(-1)
    )  # (batch, nheads, dstate, 1)
    A_c = -torch.exp(A.to(dtype)) if A_is_log else A.to(dtype)
    decay = torch.exp(step.unsqueeze(-1) * A_c)  # (batch, nheads, headdim, dstate)
    new_state = decay * state.to(dtype) + (step * x_c).unsqueeze(-1) * B_heads
    y = torch.matmul(new_state, C_heads).squeeze(-1)
    if D is not None:
        y = y + D.to(dtype) * x_c
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype), new_state.to(state.dtype)
