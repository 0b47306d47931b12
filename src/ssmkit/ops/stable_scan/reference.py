"""The exact recurrence of the stable state scan, one step per token (the ground truth).

Per channel of x: ``z_t = A_d(dt_t) h_{t-1} + dt_t x_t B_t``, ``h_t = LayerNorm(z_t)`` over d_state,
``y_t = C_t . h_t``; ``A_d = I + dt A`` ("euler") or ``exp(dt A)`` ("zoh"). Differentiated by
autograd; fp64-capable. This is the loop :class:`ssmkit.layers.grounded.StableStateSSM` always ran.
"""

from __future__ import annotations

import torch


def stable_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    *,
    eps: float,
    discretization: str = "euler",
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, dt: (batch, seqlen, d_inner)   A: (d_state, d_state)   B, C: (batch, seqlen, d_state)
    norm_weight, norm_bias: (d_state,)   initial_state: (batch, d_inner, d_state)
    seq_idx: (batch, seqlen) int; the state restarts from zero where it changes.
    Returns y (batch, seqlen, d_inner) and the final state (batch, d_inner, d_state)."""
    batch, seqlen, d_inner = x.shape
    d_state = A.shape[0]
    h = x.new_zeros(batch, d_inner, d_state) if initial_state is None else initial_state
    # Split the per-step inputs once with unbind: indexing [:, t] inside the loop would make
    # autograd build a full-size zero gradient per step in backward (quadratic in seqlen).
    dt_steps = dt[..., None].unbind(1)  # seqlen x (batch, d_inner, 1)
    dtx_steps = (dt * x)[..., None].unbind(1)
    B_steps = B[:, :, None, :].unbind(1)  # seqlen x (batch, 1, d_state)
    C_steps = C[..., None].unbind(1)  # seqlen x (batch, d_state, 1)
    keep_steps = None
    if seq_idx is not None and seqlen > 1:
        keep_steps = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(x.dtype)[:, :, None, None].unbind(1)
    A_t = A.transpose(0, 1)
    ys = []
    for t in range(seqlen):
        if keep_steps is not None and t > 0:
            h = h * keep_steps[t - 1]
        if discretization == "euler":
            # (I + dt A) h = h + dt (A h): no matrix per step, one small GEMM over all channels
            # (as one 2-D GEMM: the batched form is ~10x slower at these sizes on CPUs).
            z = torch.addcmul(h, dt_steps[t], (h.reshape(-1, d_state) @ A_t).view_as(h))
        else:
            transition = torch.linalg.matrix_exp(dt_steps[t][..., None] * A)  # (batch, d_inner, n, n)
            z = (transition @ h[..., None])[..., 0]
        z = torch.addcmul(z, dtx_steps[t], B_steps[t])
        h = layer_norm(z, norm_weight, norm_bias, eps)
        ys.append(h @ C_steps[t])  # (batch, d_inner, 1)
    return torch.cat(ys, dim=-1).transpose(1, 2), h


def layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, written out: on CPUs ``F.layer_norm`` splits even a few dozen
    rows across threads, and that costs milliseconds per step when the cores are shared.
    z: (..., d_state) -> (..., d_state)."""
    var, mean = torch.var_mean(z, dim=-1, keepdim=True, correction=0)
    return torch.addcmul(bias, (z - mean) * torch.rsqrt(var + eps), weight)
