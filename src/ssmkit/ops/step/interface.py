"""Public decode step ``selective_state_update``: checks, layout normalisation, dispatch.

Both user layouts (``mamba_ssm``'s) are turned into one canonical form before dispatch, using
views only (``unsqueeze``/``expand``: the state is never copied for the layout change):

=================  ==========================  ==================  ======================
argument           Mamba-2 layout (4-D state)  Mamba-1 layout      canonical (Mamba-2)
=================  ==========================  ==================  ======================
state              (pool, h, p, n)             (pool, d, n)        (pool, h, p, n)
x, z               (b, h, p)                   (b, d)              (b, h, p)
dt                 (b, h, p) or (b, h)         (b, d)              (b, h, p)
A                  (h, p, n) or (h,)           (d, n)              (h, p, n)
B, C               (b, g, n)                   (b, n) or (b, g, n) (b, g, n)
D, dt_bias         (h, p) or (h,)              (d,)                (h, p)
state_batch_idx    (b,) or None                (b,) or None        (b,) or None
=================  ==========================  ==================  ======================

Mamba-1 becomes h = d heads of headdim p = 1; per-head compact forms become stride-0 ``expand``
views (which is also how ``mamba_ssm``'s Mamba2 module passes them). pool = b without
``state_batch_indices``.

Backends, all on the canonical form: ``"reference"`` (``reference.py``), ``"torch"``
(``batched.py``), ``"triton"``: ``ssmkit.ops.step.triton.selective_state_update_triton(state, x,
dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, A_is_log) -> y``, which updates ``state``
in place. When gradients are needed, every backend runs out of place on the gathered state rows and
the result is written back with a differentiable copy, so a token-by-token loop can be
backpropagated (the Triton kernel's gradient comes from recomputing through ``batched.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ssmkit.ops import checks
from ssmkit.ops.common import inplace
from ssmkit.ops.dispatch import resolve
from ssmkit.ops.step.batched import selective_state_update_batched
from ssmkit.ops.step.reference import selective_state_update_ref

_OP = "ssmkit.ops.step"

Dims = Sequence[checks.Dim]


def _describe(dims: Dims) -> str:
    labels = ", ".join(label for label, _ in dims)
    sizes = [str(size) if size is not None else "?" for _, size in dims]
    shown = "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
    return f"({labels}) = {shown}"


def _shape_one_of(name: str, value: torch.Tensor, options: Sequence[Dims]) -> int:
    """Check that ``value`` has one of the shapes in ``options``; return the index of the match."""
    for index, dims in enumerate(options):
        if value.dim() == len(dims) and all(
            size is None or s == size for s, (_, size) in zip(value.shape, dims)
        ):
            return index
    expected = " or ".join(_describe(dims) for dims in options)
    raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")


class _TritonStep(torch.autograd.Function):
    """Differentiable step on gathered state rows; the kernel updates a copy of them."""

    @staticmethod
    def forward(ctx, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log):
        from ssmkit.ops.step.triton import selective_state_update_triton

        new_state = state.clone()
        y = selective_state_update_triton(
            new_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, None, A_is_log
        )
        ctx.save_for_backward(state, x, dt, A, B, C, D, z, dt_bias)
        ctx.dt_softplus, ctx.A_is_log = dt_softplus, A_is_log
        return y, new_state

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        forward = lambda *tensors: selective_state_update_batched(*tensors, ctx.dt_softplus, ctx.A_is_log)
        grad_outputs = [grad_y, grad_state]
        grads = inplace.recompute_grads(forward, ctx.saved_tensors, ctx.needs_input_grad[:9], grad_outputs)
        return (*grads, None, None)


def _canonical(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Check shapes and return the canonical (Mamba-2 layout) views, see the module docstring."""
    if state.dim() == 4:
        _, nheads, headdim, dstate = state.shape
        checks.shape("x", x, [("batch", None), ("nheads", nheads), ("headdim", headdim)])
        batch = x.shape[0]
        full, per_head = (
            [("batch", batch), ("nheads", nheads), ("headdim", headdim)],
            [("batch", batch), ("nheads", nheads)],
        )
        if _shape_one_of("dt", dt, [full, per_head]) == 1:
            dt = dt.unsqueeze(-1).expand(batch, nheads, headdim)
        A_options = [[("nheads", nheads), ("headdim", headdim), ("dstate", dstate)], [("nheads", nheads)]]
        if _shape_one_of("A", A, A_options) == 1:
            A = A[:, None, None].expand(nheads, headdim, dstate)
        checks.shape("B", B, [("batch", batch), ("ngroups", None), ("dstate", dstate)])
        ngroups = B.shape[1]
        checks.shape("C", C, [("batch", batch), ("ngroups", ngroups), ("dstate", dstate)])
        checks.divisible("nheads", nheads, "ngroups", ngroups)
        per_channel = [[("nheads", nheads), ("headdim", headdim)], [("nheads", nheads)]]
        if D is not None and _shape_one_of("D", D, per_channel) == 1:
            D = D.unsqueeze(-1).expand(nheads, headdim)
        if dt_bias is not None and _shape_one_of("dt_bias", dt_bias, per_channel) == 1:
            dt_bias = dt_bias.unsqueeze(-1).expand(nheads, headdim)
        if z is not None:
            checks.shape("z", z, full)
        return state, x, dt, A, B, C, D, z, dt_bias

    if state.dim() != 3:
        raise ValueError(
            "state must have shape (batch, nheads, headdim, dstate) or (batch, dim, dstate), "
            f"got {tuple(state.shape)}"
        )
    _, dim, dstate = state.shape
    checks.shape("x", x, [("batch", None), ("dim", dim)])
    batch = x.shape[0]
    checks.shape("dt", dt, [("batch", batch), ("dim", dim)])
    checks.shape("A", A, [("dim", dim), ("dstate", dstate)])
    shared = [("batch", batch), ("dstate", dstate)]
    if _shape_one_of("B", B, [shared, [("batch", batch), ("ngroups", None), ("dstate", dstate)]]) == 0:
        # B and C shared by all channels: one group.
        checks.shape("C", C, shared)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    else:
        checks.shape("C", C, [("batch", batch), ("ngroups", B.shape[1]), ("dstate", dstate)])
    ngroups = B.shape[1]
    checks.divisible("dim", dim, "ngroups", ngroups)
    for name, value in (("D", D), ("dt_bias", dt_bias)):
        if value is not None:
            checks.shape(name, value, [("dim", dim)])
    if z is not None:
        checks.shape("z", z, [("batch", batch), ("dim", dim)])
    unsqueeze = lambda t: None if t is None else t.unsqueeze(-1)
    # Mamba-1 as dim heads of headdim 1: A (dim, dstate) -> (dim, 1, dstate).
    return (
        state.unsqueeze(2),
        unsqueeze(x),
        unsqueeze(dt),
        A.unsqueeze(1),
        B,
        C,
        unsqueeze(D),
        unsqueeze(z),
        unsqueeze(dt_bias),
    )


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    A_is_log: bool = False,
) -> torch.Tensor:
    """One decode step of a selective SSM; updates ``state`` IN PLACE and returns y.

    Mamba-2 layout: state (batch, nheads, headdim, dstate)   x, z: (batch, nheads, headdim)
        dt: (batch, nheads, headdim) or (batch, nheads)   A: (nheads, headdim, dstate) or (nheads,)
        B, C: (batch, ngroups, dstate)   D, dt_bias: (nheads, headdim) or (nheads,)
    Mamba-1 layout: state (batch, dim, dstate)   x, dt, z: (batch, dim)   A: (dim, dstate)
        B, C: (batch, dstate) or (batch, ngroups, dstate)   D, dt_bias: (dim,)
    state_batch_indices: int (batch,); row i updates state[state_batch_indices[i]] of a state pool
        with any number of rows. Not range-checked (that would synchronise with the GPU);
        duplicate indices are undefined.
    A_is_log (an ssmkit extension): A holds a layer's A_log, in any of A's shapes, and the step uses
        A = -exp(A_log), computed inside the step (a decode step then launches nothing for A).

    With dt' = softplus(dt + dt_bias) (softplus only if dt_softplus):
        state = exp(dt' A) state + dt' x B;   y = (state C + D x) * silu(z)
    Computed in fp32 (fp64 for fp64 inputs); the state is written back in its own dtype and y is
    returned shaped and typed like x. Differentiable (see the module docstring); a leaf state that
    requires grad must be cloned first.
    """
    names = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    values = (state, x, dt, A, B, C, D, z, dt_bias)
    for name, value in zip(names, values):
        if checks.tensor(name, value, optional=name in ("D", "z", "dt_bias")) is not None:
            checks.floating(name, value)
    indices = checks.tensor("state_batch_indices", state_batch_indices, optional=True)
    checks.same_device("state", state, **dict(zip(names[1:], values[1:])), state_batch_indices=indices)
    canonical = _canonical(state, x, dt, A, B, C, D, z, dt_bias)
    state4, inputs = canonical[0], canonical[1:]
    batch = x.shape[0]
    if indices is None:
        if state.shape[0] != batch:
            raise ValueError(
                f"state must have batch size {batch} (that of x) without state_batch_indices, "
                f"got shape {tuple(state.shape)}"
            )
    else:
        checks.integer("state_batch_indices", indices)
        checks.shape("state_batch_indices", indices, [("batch", batch)])

    implementation = resolve(_OP, backend, x.device)
    needs_grad = inplace.needs_grad(*values)
    if implementation == "triton" and not needs_grad:
        from ssmkit.ops.step.triton import selective_state_update_triton

        y = selective_state_update_triton(state4, *inputs, dt_softplus, indices, A_is_log)
        return y if state.dim() == 4 else y.squeeze(-1)

    if needs_grad:
        # Checked on the user's tensor: the 4-D view of a 3-D leaf is not itself a leaf.
        inplace.check_not_grad_leaf("state", state)
    if implementation == "triton":
        step = lambda rows: _TritonStep.apply(rows, *inputs, dt_softplus, A_is_log)
    else:
        fn = selective_state_update_ref if implementation == "reference" else selective_state_update_batched
        step = lambda rows: fn(rows, *inputs, dt_softplus, A_is_log)
    y = inplace.update_rows(state4, indices, needs_grad, step)
    return y if state.dim() == 4 else y.squeeze(-1)
