"""Reference causal depthwise conv1d: explicit loops over time steps and taps.

Shapes: x (batch, dim, seqlen), weight (dim, width), bias (dim,), seq_idx (batch, seqlen),
states (batch, dim, width - 1). Arithmetic in fp32 (fp64 stays fp64).

Position t of the output reads inputs t - width + 1 .. t; inputs before position 0 come from the
initial state (state[..., j] is the input at position j - (width - 1)), or are zero.
"""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: half-precision inputs are never summed in half."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def apply_activation(values: torch.Tensor, activation: str | None) -> torch.Tensor:
    """activation: None or "silu" (the interface maps "swish" to "silu")."""
    return values * torch.sigmoid(values) if activation == "silu" else values


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution, one output position and one tap at a time.

    x: (batch, dim, seqlen)   weight: (dim, width)   bias: (dim,)   seq_idx: (batch, seqlen)
    initial_states: (batch, dim, width - 1), the history of the sequence seq_idx[:, 0]
    Returns out: (batch, dim, seqlen) in x's dtype and final_states: (batch, dim, width - 1), the
    last width - 1 inputs of each row, zeroed where they belong to another sequence than the last.
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    dtype = compute_dtype(x, weight, bias, initial_states)
    if initial_states is None:
        history = torch.zeros(batch, dim, width - 1, dtype=dtype, device=x.device)
    else:
        history = initial_states.to(dtype)
    # padded[..., t + k] is the input that tap k of output position t reads.
    padded = torch.cat([history, x.to(dtype)], dim=-1)
    weight = weight.to(dtype)
    segments = None
    if seq_idx is not None:
        # The history belongs to the first sequence of the row.
        segments = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)

    columns = []
    for t in range(seqlen):
        acc = torch.zeros(batch, dim, dtype=dtype, device=x.device)
        if bias is not None:
            acc = acc + bias.to(dtype)
        for k in range(width):
            term = weight[:, k] * padded[:, :, t + k]
            if segments is not None:
                # Inputs of an earlier sequence in the same row are invisible.
                same = segments[:, t + k] == segments[:, t + width - 1]
                term = term * same[:, None].to(dtype)
            acc = acc + term
        columns.append(apply_activation(acc, activation))
    out = torch.stack(columns, dim=-1) if columns else padded[:, :, :0]

    final_states = padded[:, :, seqlen:]
    if segments is not None:
        final_states = final_states * (segments[:, seqlen:] == seq_idx[:, -1:])[:, None].to(dtype)
    return out.to(x.dtype), final_states.to(x.dtype)


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode steps: push each new input into the state window, then take one output.

    x: (batch, dim, seqlen_step)   conv_state: (batch, dim, state_len >= width - 1)
    weight: (dim, width)   bias: (dim,)
    Returns out: (batch, dim, seqlen_step) in x's dtype and the new conv_state (same shape and
    dtype as conv_state: the last state_len inputs seen).
    """
    state_len = conv_state.shape[-1]
    width = weight.shape[1]
    dtype = compute_dtype(x, weight, bias, conv_state)
    state = conv_state.to(dtype)
    weight = weight.to(dtype)
    columns = []
    for t in range(x.shape[-1]):
        extended = torch.cat([state, x[:, :, t : t + 1].to(dtype)], dim=-1)
        window = extended[:, :, extended.shape[-1] - width :]
        acc = (window * weight).sum(dim=-1)
        if bias is not None:
            acc = acc + bias.to(dtype)
        columns.append(apply_activation(acc, activation))
        # Roll left by one: the oldest input drops out, the new one enters at the end.
        state = extended[:, :, extended.shape[-1] - state_len :]
    return torch.stack(columns, dim=-1).to(x.dtype), state.to(conv_state.dtype)
