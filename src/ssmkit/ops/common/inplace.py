"""Decode steps that update a state IN PLACE yet stay differentiable (conv1d and SSM steps).

A decode step overwrites its state rows. Autograd cannot differentiate through an overwrite of
values it still needs, so when gradients are wanted the step runs out of place on a copy of the
rows and the result is copied back (a differentiable copy). Forward-only kernels (Triton) get
their gradient by re-running a PyTorch version of the step under autograd in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd is recording and any of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_not_grad_leaf(name: str, state: torch.Tensor) -> None:
    """Refuse a leaf state that requires grad: the in-place update would raise deep inside autograd."""
    if state.is_leaf and state.requires_grad:
        raise ValueError(
            f"{name} is updated in place and cannot be a leaf tensor that requires grad; "
            f"pass a clone (e.g. {name}.clone()) to differentiate with respect to it"
        )


def update_rows(
    state: torch.Tensor,
    indices: torch.Tensor | None,
    grad: bool,
    step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Run ``step(rows) -> (out, new_rows)`` on the rows of ``state`` and write ``new_rows`` back.

    state: (pool, ...)   indices: int (batch,) rows of the pool, or None for all (pool = batch)
    grad: whether autograd needs the old rows; ``step`` must then not modify ``rows`` in place.
    Returns ``out`` from ``step``.
    """
    # Copy the rows when autograd may need the old values after they are overwritten.
    if indices is not None:
        indices = indices.long()  # index_copy_ takes int64 only
        rows = state.index_select(0, indices)
    else:
        rows = state.clone() if grad else state
    out, new_rows = step(rows)
    if indices is not None:
        state.index_copy_(0, indices, new_rows)
    else:
        state.copy_(new_rows)
    return out


def recompute_grads(
    forward: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor | None],
    needs_input_grad: Sequence[bool],
    grad_outputs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Gradients of ``forward(*inputs)`` for the inputs flagged in ``needs_input_grad``, by
    re-running it under autograd (how a forward-only Triton kernel is differentiated).

    Returns one entry per input: its gradient, or None where not flagged or not reached.
    """
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(need) if isinstance(t, torch.Tensor) else t
            for t, need in zip(inputs, needs_input_grad)
        ]
        outputs = forward(*leaves)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    wrt = [leaf for leaf, need in zip(leaves, needs_input_grad) if need]
    grads = iter(
        torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        if pairs and wrt
        else [None] * len(wrt)
    )
    return [next(grads) if need else None for need in needs_input_grad]
