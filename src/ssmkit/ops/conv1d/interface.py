"""Public causal conv1d functions: argument checks, backend dispatch, the Triton update's autograd.

Backends: ``"reference"`` (``reference.py``, loops over positions and taps), ``"torch"``
(``grouped.py``, grouped ``F.conv1d``) and ``"triton"`` (``ssmkit.ops.conv1d.triton``):

- ``causal_conv1d_fn_triton(x, weight, bias, seq_idx, initial_states, return_final_states,
  activation) -> (out, final_states or None)``
- ``causal_conv1d_update_triton(x, conv_state, weight, bias, activation, conv_state_indices)
  -> out``, updating ``conv_state`` in place; x is always (batch, dim, seqlen_step).

``activation`` reaches every backend as None or "silu". ``causal_conv1d_fn_triton`` carries its
own backward. The update kernel has none: when gradients are needed, it runs on a copy of the
gathered state rows and its gradient comes from recomputing the step through ``grouped.py`` under
autograd (one extra step in backward, nothing in inference, where it updates in place).

Semantics of ``seq_idx`` with states (a superset of ``causal_conv1d``, which forbids the mix):
``initial_states`` is the history of the row's first sequence, ``seq_idx[:, 0]``; final states are
the row's last width - 1 inputs with those of other sequences than the last one zeroed, i.e. the
history needed to continue the last sequence in a next call.
"""

from __future__ import annotations

import torch

from ssmkit.ops import checks
from ssmkit.ops.common import inplace
from ssmkit.ops.conv1d.grouped import causal_conv1d_grouped, causal_conv1d_update_grouped
from ssmkit.ops.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from ssmkit.ops.dispatch import resolve

_OP = "ssmkit.ops.conv1d"
_ACTIVATIONS = (None, "silu", "swish")


class _TritonConv1dUpdate(torch.autograd.Function):
    """Differentiable decode step on gathered state rows; the kernel runs on a copy of them."""

    @staticmethod
    def forward(ctx, x, conv_state, weight, bias, activation):
        from ssmkit.ops.conv1d.triton import causal_conv1d_update_triton

        new_state = conv_state.clone()
        out = causal_conv1d_update_triton(x, new_state, weight, bias, activation, None)
        ctx.save_for_backward(x, conv_state, weight, bias)
        ctx.activation = activation
        return out, new_state

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        inputs = ctx.saved_tensors
        forward = lambda x, s, w, b: causal_conv1d_update_grouped(x, s, w, b, ctx.activation)
        grads = inplace.recompute_grads(forward, inputs, ctx.needs_input_grad[:4], [grad_out, grad_state])
        return (*grads, None)


def _check_activation(activation: object) -> str | None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return None if activation is None else "silu"


def _check_weight(weight: object, bias: object, dim: int) -> int:
    """Validate weight (dim, width) and bias (dim,); return width."""
    weight = checks.tensor("weight", weight)
    checks.floating("weight", weight)
    checks.shape("weight", weight, [("dim", dim), ("width", None)])
    if weight.shape[1] < 1:
        raise ValueError(f"weight must have width >= 1, got shape {tuple(weight.shape)}")
    bias = checks.tensor("bias", bias, optional=True)
    if bias is not None:
        checks.floating("bias", bias)
        checks.shape("bias", bias, [("dim", dim)])
    return weight.shape[1]


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d: out[b, d, t] = act(bias[d] + sum_k weight[d, k] x[b, d, t - width + 1 + k]).

    x: (batch, dim, seqlen)   weight: (dim, width)   bias: (dim,)
    seq_idx: int (batch, seqlen); positions of different sequences in one row never mix
    initial_states: (batch, dim, width - 1), any float dtype (used in x's); inputs before position 0
    activation: None, "silu" or "swish" (= "silu")
    Returns out: (batch, dim, seqlen) in x's dtype and, if return_final_states, final_states:
    (batch, dim, width - 1), the inputs the next call needs as its initial_states.
    """
    x = checks.tensor("x", x)
    checks.floating("x", x)
    checks.shape("x", x, [("batch", None), ("dim", None), ("seqlen", None)])
    batch, dim, seqlen = x.shape
    width = _check_weight(weight, bias, dim)
    seq_idx = checks.tensor("seq_idx", seq_idx, optional=True)
    if seq_idx is not None:
        checks.integer("seq_idx", seq_idx)
        checks.shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
        if seqlen == 0:
            raise ValueError("seq_idx needs seqlen >= 1, got x of shape (batch, dim, 0)")
    initial_states = checks.tensor("initial_states", initial_states, optional=True)
    if initial_states is not None:
        checks.shape(
            "initial_states", initial_states, [("batch", batch), ("dim", dim), ("width - 1", width - 1)]
        )
        checks.floating("initial_states", initial_states)
        # The states hold past inputs: a cache kept in fp32 while autocast hands us bf16 inputs
        # carries values exactly representable in x's dtype, so casting loses nothing.
        initial_states = initial_states.to(x.dtype)
    checks.same_device("x", x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states)
    activation = _check_activation(activation)

    implementation = resolve(_OP, backend, x.device)
    if implementation == "triton":
        from ssmkit.ops.conv1d.triton import causal_conv1d_fn_triton

        out, final_states = causal_conv1d_fn_triton(
            x, weight, bias, seq_idx, initial_states, return_final_states, activation
        )
        return (out, final_states) if return_final_states else out
    fn = causal_conv1d_ref if implementation == "reference" else causal_conv1d_grouped
    out, final_states = fn(x, weight, bias, seq_idx, initial_states, activation)
    return (out, final_states) if return_final_states else out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state_indices: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode step(s) of the causal conv1d, rolling ``conv_state`` IN PLACE.

    x: (batch, dim) or (batch, dim, seqlen_step)   weight: (dim, width)   bias: (dim,)
    conv_state: (batch, dim, state_len) with state_len >= width - 1, the last state_len inputs
    (or (pool, dim, state_len) with conv_state_indices)
    conv_state_indices: int (batch,); row i of x uses and updates conv_state[conv_state_indices[i]].
    Indices are not range-checked (that would synchronise with the GPU); duplicates are undefined.
    Returns out shaped like x, in x's dtype.

    Gradients flow through the in-place update (to x, weight, bias and the previous state), so a
    token-by-token loop is differentiable; a leaf conv_state that requires grad must be cloned first.
    """
    x = checks.tensor("x", x)
    conv_state = checks.tensor("conv_state", conv_state)
    checks.floating("x", x)
    checks.floating("conv_state", conv_state)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (batch, dim) or (batch, dim, seqlen_step), got {tuple(x.shape)}")
    batch, dim = x.shape[:2]
    width = _check_weight(weight, bias, dim)
    checks.shape("conv_state", conv_state, [("batch", None), ("dim", dim), ("state_len", None)])
    if conv_state.shape[-1] < width - 1:
        raise ValueError(
            f"conv_state must have state_len >= width - 1 = {width - 1}, got shape {tuple(conv_state.shape)}"
        )
    indices = checks.tensor("conv_state_indices", conv_state_indices, optional=True)
    if indices is None:
        if conv_state.shape[0] != batch:
            raise ValueError(
                f"conv_state must have shape (batch, dim, state_len) = ({batch}, {dim}, ?), "
                f"got {tuple(conv_state.shape)}"
            )
    else:
        checks.integer("conv_state_indices", indices)
        checks.shape("conv_state_indices", indices, [("batch", batch)])
    checks.same_device("x", x, conv_state=conv_state, weight=weight, bias=bias, conv_state_indices=indices)
    activation = _check_activation(activation)

    steps = x if x.dim() == 3 else x.unsqueeze(-1)
    implementation = resolve(_OP, backend, x.device)
    needs_grad = inplace.needs_grad(x, conv_state, weight, bias)
    if implementation == "triton" and not needs_grad:
        from ssmkit.ops.conv1d.triton import causal_conv1d_update_triton

        out = causal_conv1d_update_triton(steps, conv_state, weight, bias, activation, indices)
        return out if x.dim() == 3 else out.squeeze(-1)

    if needs_grad:
        inplace.check_not_grad_leaf("conv_state", conv_state)
    if implementation == "triton":
        step = lambda rows: _TritonConv1dUpdate.apply(steps, rows, weight, bias, activation)
    else:
        fn = causal_conv1d_update_ref if implementation == "reference" else causal_conv1d_update_grouped
        step = lambda rows: fn(steps, rows, weight, bias, activation)
    out = inplace.update_rows(conv_state, indices, needs_grad, step)
    return out if x.dim() == 3 else out.squeeze(-1)
