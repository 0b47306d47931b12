"""Reference decode step of a selective SSM, one (batch row, head) at a time.

Works on the canonical Mamba-2 layout that ``interface.py`` builds from either user layout:
state (batch, nheads, headdim, dstate), x/dt/z (batch, nheads, headdim), A (nheads, headdim,
dstate), B/C (batch, ngroups, dstate), D/dt_bias (nheads, headdim). Head h reads group
h // (nheads // ngroups). The recurrence, with dt' = softplus(dt + dt_bias) when asked:

    state <- exp(dt' A) * state + dt' * x * B        (zero-order hold for A, Euler for B, as Mamba)
    y     = state @ C + D * x,  then y * silu(z)

With ``A_is_log`` the A argument holds A_log and the step uses A = -exp(A_log) (a Mamba layer's
parametrisation), computed in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: half-precision inputs are never accumulated in half."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def selective_state_update_ref(
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
    Returns y: (batch, nheads, headdim) in x's dtype and the new state (shape and dtype of state).
    The output reads the new state before it is rounded to the state's dtype.
    """
    batch, nheads = x.shape[:2]
    heads_per_group = nheads // B.shape[1]
    dtype = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    A = -torch.exp(A.to(dtype)) if A_is_log else A
    ys, new_states = [], []
    for i in range(batch):
        row_ys, row_states = [], []
        for h in range(nheads):
            g = h // heads_per_group
            step = dt[i, h].to(dtype)  # (headdim,)
            if dt_bias is not None:
                step = step + dt_bias[h].to(dtype)
            if dt_softplus:
                step = F.softplus(step)
            decay = torch.exp(step[:, None] * A[h].to(dtype))  # (headdim, dstate)
            x_ih = x[i, h].to(dtype)
            new = decay * state[i, h].to(dtype) + (step * x_ih)[:, None] * B[i, g].to(dtype)[None, :]
            y = new @ C[i, g].to(dtype)
            if D is not None:
                y = y + D[h].to(dtype) * x_ih
            if z is not None:
                gate = z[i, h].to(dtype)
                y = y * gate * torch.sigmoid(gate)
            row_ys.append(y)
            row_states.append(new)
        ys.append(torch.stack(row_ys))
        new_states.append(torch.stack(row_states))
    return torch.stack(ys).to(x.dtype), torch.stack(new_states).to(state.dtype)
