"""Eager twins of the Triton custom ops: the same kernels without the custom-op dispatch.

Every Triton kernel is registered as a ``torch.library`` custom op so that torch.compile traces it
without a graph break. Outside torch.compile that registration only costs host time: the dispatcher,
default filling and the generated autograd wrapper add tens of µs per call, several times a small
kernel's run time (measured on an H100 host: Mamba-1 scan forward 869 µs eager against 294 µs in a
CUDA graph). So each op keeps one plain implementation, and callers go through
:class:`EagerAutograd` (differentiable ops) or :func:`op_or_impl` (forward-only ops), which pick the
custom op while compiling and the plain implementation otherwise. Both paths run the same launcher
code, so the tests of one cover the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def compiling(args: Sequence[object] = ()) -> bool:
    """True when the call is being traced rather than run: under torch.compile (dynamo), under a
    dispatch mode (make_fx, AOT autograd, opcheck) or with traced tensors (fake, functional).
    Only plain tensors may reach a Triton launcher."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def op_or_impl(op: Callable[..., Any], impl: Callable[..., Any]) -> Callable[..., Any]:
    """A callable that runs the custom op when traced (see :func:`compiling`), else the plain
    implementation it wraps."""

    def call(*args: object) -> Any:
        return op(*args) if compiling(args) else impl(*args)

    return call


def _needs_grad(inputs: Sequence[object]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


class EagerAutograd:
    """Runs a custom op with an autograd formula through a plain ``torch.autograd.Function``.

    forward(*inputs) -> tuple of tensors: the op's implementation.
    setup_context(ctx, inputs, output) and backward(ctx, *grads): the functions registered with
        ``register_autograd`` (they only use ``ctx.save_for_backward``/attributes, which both kinds
        of context support).
    non_differentiable: indices of outputs that only carry saved values to the backward.

    ``__call__(op, *inputs)``: ``op(*inputs)`` while compiling; the plain forward when no gradient
    is needed; the autograd function otherwise.
    """

    def __init__(
        self,
        forward: Callable[..., tuple[torch.Tensor, ...]],
        setup_context: Callable[..., None],
        backward: Callable[..., tuple[Any, ...]],
        non_differentiable: Sequence[int] = (),
    ) -> None:
        self.forward = forward

        class _Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                output = forward(*inputs)
                setup_context(ctx, inputs, output)
                ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
                return output

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        self._function = _Function

    def __call__(self, op: Callable[..., Any], *inputs: object) -> tuple[torch.Tensor, ...]:
        if compiling(inputs):
            return op(*inputs)
        if not _needs_grad(inputs):
            return self.forward(*inputs)
        return self._function.apply(*inputs)
