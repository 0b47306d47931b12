"""Triton causal depthwise conv1d, registered as ``ssmkit::causal_conv1d_fwd`` / ``_bwd`` / ``_update``.

The forward op always returns the final states next to the output (they cost (batch, dim,
width - 1) stores) so its schema has no optional outputs; its autograd formula is registered with
``torch.library.register_autograd`` (the custom-op form of an ``autograd.Function``) and gives
gradients for x, weight, bias and initial_states, including those arriving through final_states.
The decode op mutates ``conv_state`` in place and never synchronises with the host, so CUDA graphs
capture it.
"""

from __future__ import annotations

import contextlib

import torch

from ssmkit.ops.common.eager import EagerAutograd, op_or_impl
from ssmkit.ops.conv1d.triton.conv_bwd import causal_conv1d_bwd
from ssmkit.ops.conv1d.triton.conv_fwd import causal_conv1d_fwd
from ssmkit.ops.conv1d.triton.conv_update import causal_conv1d_update

__all__ = ["causal_conv1d_fn_triton", "causal_conv1d_update_triton"]


def _device_context(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device: make it the device of the tensors (switching
    # only when it differs; entering torch.cuda.device costs host time on every decode step).
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _is_silu(activation: str | None) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _conv_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    final_states = torch.empty((batch, dim, width - 1), dtype=x.dtype, device=x.device)
    if seqlen == 0:
        # Nothing new was seen: the final state is the history (zero when there is none).
        final_states.copy_(initial_states if initial_states is not None else torch.zeros_like(final_states))
        return out, final_states
    if batch * dim > 0:
        with _device_context(x):
            causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, silu, out, final_states)
    return out, final_states


_causal_conv1d_fwd_op = torch.library.custom_op(
    "ssmkit::causal_conv1d_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, Tensor? initial_states, bool silu) "
    "-> (Tensor, Tensor)",
)(_conv_fwd_impl)


@_causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, seq_idx, initial_states, silu):
    batch, dim, _ = x.shape
    return (
        torch.empty_like(x, memory_format=torch.preserve_format),
        torch.empty((batch, dim, weight.shape[1] - 1), dtype=x.dtype, device=x.device),
    )


def _conv_bwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    dout: torch.Tensor,
    dfinal_states: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx, dweight, dbias, dinitial_states; a gradient whose input is None comes back as an
    empty tensor (custom ops cannot return None)."""
    batch, dim, seqlen = x.shape
    dx = torch.empty_like(x, memory_format=torch.preserve_format)
    dinit = (
        torch.empty_like(initial_states)
        if initial_states is not None
        else torch.empty((0,), dtype=x.dtype, device=x.device)
    )
    if seqlen == 0 or batch * dim == 0:
        dweight = torch.zeros_like(weight)
        dbias = (
            torch.zeros_like(bias) if bias is not None else torch.empty((0,), dtype=x.dtype, device=x.device)
        )
        if initial_states is not None:
            dinit.copy_(
                dfinal_states if dfinal_states is not None and seqlen == 0 else torch.zeros_like(dinit)
            )
        return dx, dweight, dbias, dinit
    with _device_context(x):
        dweight, dbias = causal_conv1d_bwd(
            x,
            weight,
            bias,
            seq_idx,
            initial_states,
            dout,
            dfinal_states,
            silu,
            dx,
            dinit if initial_states is not None else None,
        )
    dbias = dbias.to(bias.dtype) if bias is not None else torch.empty((0,), dtype=x.dtype, device=x.device)
    return dx, dweight.to(weight.dtype), dbias, dinit


_causal_conv1d_bwd_op = torch.library.custom_op(
    "ssmkit::causal_conv1d_bwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, Tensor? initial_states, Tensor dout, "
    "Tensor? dfinal_states, bool silu) -> (Tensor, Tensor, Tensor, Tensor)",
)(_conv_bwd_impl)


@_causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu):
    empty = torch.empty((0,), dtype=x.dtype, device=x.device)
    return (
        torch.empty_like(x, memory_format=torch.preserve_format),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else empty,
        torch.empty_like(initial_states) if initial_states is not None else empty.clone(),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, seq_idx, initial_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu


def _backward(ctx, grad_out, grad_final_states):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    dx, dweight, dbias, dinit = op_or_impl(_causal_conv1d_bwd_op, _conv_bwd_impl)(
        x, weight, bias, seq_idx, initial_states, grad_out, grad_final_states, ctx.silu
    )
    return (
        dx,
        dweight,
        dbias if bias is not None else None,
        None,
        dinit if initial_states is not None else None,
        None,
    )


torch.library.register_autograd("ssmkit::causal_conv1d_fwd", _backward, setup_context=_setup_context)
_conv = EagerAutograd(_conv_fwd_impl, _setup_context, _backward)


@torch.library.custom_op(
    "ssmkit::causal_conv1d_update",
    mutates_args=("conv_state",),
    schema="(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu, "
    "Tensor? conv_state_indices) -> Tensor",
)
def _causal_conv1d_update_op(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    conv_state_indices: torch.Tensor | None,
) -> torch.Tensor:
    return _launch_update(x, conv_state, weight, bias, silu, conv_state_indices)


def _launch_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    conv_state_indices: torch.Tensor | None,
) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    if x.shape[0] * x.shape[1] > 0:
        with _device_context(x):
            causal_conv1d_update(x, conv_state, weight, bias, silu, conv_state_indices, out)
    return out


@_causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu, conv_state_indices):
    return torch.empty_like(x, memory_format=torch.preserve_format)


def causal_conv1d_fn_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    return_final_states: bool,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv1d, forward and backward in Triton.

    x: (batch, dim, seqlen), any strides (channel-last views of (batch, seqlen, dim) included)
    weight: (dim, width)   bias: (dim,) or None   seq_idx: (batch, seqlen) int or None
    initial_states: (batch, dim, width - 1) or None, the history of the row's first sequence
    activation: None, "silu" (or "swish")
    Returns out: (batch, dim, seqlen) in x's dtype and, if return_final_states, final_states:
    (batch, dim, width - 1), the last width - 1 inputs (zeroed where they belong to another
    sequence than the last); else None. Gradients flow to x, weight, bias and initial_states.
    Computes in fp32 (fp64 for fp64 inputs). Arguments are validated by the interface.
    """
    out, final_states = _conv(
        _causal_conv1d_fwd_op, x, weight, bias, seq_idx, initial_states, _is_silu(activation)
    )
    return out, final_states if return_final_states else None


def causal_conv1d_update_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    conv_state_indices: torch.Tensor | None,
) -> torch.Tensor:
    """Decode steps of the causal conv1d; shifts ``conv_state`` in place by seqlen_step.

    x: (batch, dim, seqlen_step)   conv_state: (batch or pool, dim, state_len >= width - 1)
    weight: (dim, width)   bias: (dim,) or None   activation: None, "silu" (or "swish")
    conv_state_indices: None or int (batch,): row i uses conv_state[conv_state_indices[i]]
    Returns out: (batch, dim, seqlen_step) in x's dtype. No host synchronisation (CUDA-graph safe).
    """
    # Eager decode: the custom op's dispatch costs more host time than the launch itself (tens of
    # µs per call); only torch.compile needs to see the op.
    update = op_or_impl(_causal_conv1d_update_op, _launch_update)
    return update(x, conv_state, weight, bias, _is_silu(activation), conv_state_indices)
