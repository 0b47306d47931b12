"""PyTorch fast path for the causal depthwise conv1d: one grouped ``F.conv1d`` call.

With ``seq_idx`` the taps that would reach into an earlier sequence are masked, which a plain
convolution cannot do; that case multiplies a (batch, dim, seqlen, width) window view by the mask
(width is small, 2 to 4 in Mamba, so the extra memory is a few copies of x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.conv1d.reference import apply_activation, compute_dtype


def causal_conv1d_grouped(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (batch, dim, seqlen)   weight: (dim, width)   bias: (dim,)   seq_idx: (batch, seqlen)
    initial_states: (batch, dim, width - 1).
    Returns out: (batch, dim, seqlen) in x's dtype and final_states: (batch, dim, width - 1)
    (same semantics as ``reference.causal_conv1d_ref``).
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    dtype = compute_dtype(x, weight, bias, initial_states)
    if initial_states is None:
        history = torch.zeros(batch, dim, width - 1, dtype=dtype, device=x.device)
    else:
        history = initial_states.to(dtype)
    padded = torch.cat([history, x.to(dtype)], dim=-1)  # (batch, dim, width - 1 + seqlen)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    if seq_idx is None:
        out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=dim)
        final_states = padded[:, :, seqlen:]
    else:
        segments = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)
        same = segments.unfold(-1, width, 1) == seq_idx.unsqueeze(-1)  # (batch, seqlen, width)
        windows = padded.unfold(-1, width, 1)  # (batch, dim, seqlen, width), a view
        out = torch.einsum("bdlk,dk->bdl", windows * same.unsqueeze(1).to(dtype), weight)
        if bias is not None:
            out = out + bias.unsqueeze(-1)
        keep = (segments[:, seqlen:] == seq_idx[:, -1:]).unsqueeze(1).to(dtype)
        final_states = padded[:, :, seqlen:] * keep
    return apply_activation(out, activation).to(x.dtype), final_states.to(x.dtype)


def causal_conv1d_update_grouped(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (batch, dim, seqlen_step)   conv_state: (batch, dim, state_len >= width - 1)
    weight: (dim, width)   bias: (dim,).
    Returns out: (batch, dim, seqlen_step) in x's dtype and the new conv_state (shape and dtype of
    conv_state).
    """
    dim, width = weight.shape
    state_len, steps = conv_state.shape[-1], x.shape[-1]
    dtype = compute_dtype(x, weight, bias, conv_state)
    extended = torch.cat([conv_state.to(dtype), x.to(dtype)], dim=-1)  # (batch, dim, state_len + steps)
    # Only the last width - 1 state entries reach the new outputs.
    window = extended[:, :, state_len - (width - 1) :]
    # A few multiply-adds per output: for the usual one-token decode step this beats F.conv1d, whose
    # per-call setup dominates (and whose threading is slow on small inputs).
    weight = weight.to(dtype)
    out = window[:, :, 0:steps] * weight[:, 0, None]
    for tap in range(1, width):
        out = out + window[:, :, tap : tap + steps] * weight[:, tap, None]
    if bias is not None:
        out = out + bias.to(dtype)[:, None]
    new_state = extended[:, :, steps:]
    return apply_activation(out, activation).to(x.dtype), new_state.to(conv_state.dtype)
