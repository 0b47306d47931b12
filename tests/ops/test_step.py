"""Decode step: fast paths vs the fp64 reference (forward, state and gradients) in both layouts,
compact per-head forms, state pools, and token-by-token steps against the full scans."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops import selective_state_update
from tests.helpers import assert_close, backend_params, on_interpreter

BACKENDS = backend_params("ssmkit.ops.step")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp64 tensor holding values representable in ``dtype``: both paths then get the same
    cotangent, and the comparison measures the operator alone."""
    return t.to(dtype).double()


NAMES = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def _inputs(case: str, small: bool, device: torch.device) -> tuple[dict, int]:
    """fp64 inputs for one step; returns (kwargs, pool rows). Cases:
    mamba2       full Mamba-2 layout, g = 1
    mamba2_heads compact per-head A, dt, D, dt_bias, g = 2
    mamba2_views per-head values as stride-0 expanded views (what mamba_ssm's Mamba2 passes), g = 3
    mamba1       Mamba-1 layout, B and C shared by all channels
    mamba1_groups Mamba-1 layout with (batch, ngroups, dstate) B and C
    pool         Mamba-2 layout with state_batch_indices into a larger state pool
    """
    f64 = dict(device=device, dtype=torch.float64)
    batch, nheads, headdim, dstate = 2, 3, (8 if small else 24), 13
    if case.startswith("mamba1"):
        dim, ngroups = (12, 3) if case == "mamba1_groups" else (37, 1)
        group_shape = (batch, ngroups, dstate) if case == "mamba1_groups" else (batch, dstate)
        args = dict(
            state=torch.randn(batch, dim, dstate, **f64),
            x=torch.randn(batch, dim, **f64),
            dt=torch.randn(batch, dim, **f64) - 1,
            A=-torch.rand(dim, dstate, **f64) - 0.5,
            B=torch.randn(*group_shape, **f64),
            C=torch.randn(*group_shape, **f64),
            D=torch.randn(dim, **f64),
            z=torch.randn(batch, dim, **f64),
            dt_bias=torch.randn(dim, **f64) / 2,
        )
        return args, batch
    ngroups = {"mamba2": 1, "mamba2_heads": 2, "mamba2_views": 3, "pool": 1}[case]
    nheads = 6 if case in ("mamba2_heads", "mamba2_views") else nheads
    pool = 5 if case == "pool" else batch
    args = dict(
        state=torch.randn(pool, nheads, headdim, dstate, **f64),
        x=torch.randn(batch, nheads, headdim, **f64),
        B=torch.randn(batch, ngroups, dstate, **f64),
        C=torch.randn(batch, ngroups, dstate, **f64),
        z=torch.randn(batch, nheads, headdim, **f64),
    )
    if case == "mamba2_heads":
        args.update(
            dt=torch.randn(batch, nheads, **f64) - 1,
            A=-torch.rand(nheads, **f64) - 0.5,
            D=torch.randn(nheads, **f64),
            dt_bias=torch.randn(nheads, **f64) / 2,
        )
    else:
        args.update(
            dt=torch.randn(batch, nheads, headdim, **f64) - 1,
            A=-torch.rand(nheads, headdim, dstate, **f64) - 0.5,
            D=torch.randn(nheads, headdim, **f64),
            dt_bias=torch.randn(nheads, headdim, **f64) / 2,
        )
    return args, pool


def _as_views(args: dict) -> dict:
    """Per-head leaves expanded with stride 0, as mamba_ssm's Mamba2 module passes them."""
    nheads, headdim, dstate = args["state"].shape[1:]
    batch = args["x"].shape[0]
    views = dict(args)
    views["A"] = args["A"][:, 0, 0][:, None, None].expand(nheads, headdim, dstate)
    views["dt"] = args["dt"][..., 0][..., None].expand(batch, nheads, headdim)
    views["D"] = args["D"][:, 0][:, None].expand(nheads, headdim)
    views["dt_bias"] = args["dt_bias"][:, 0][:, None].expand(nheads, headdim)
    return views


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", ["mamba2", "mamba2_heads", "mamba2_views", "mamba1", "mamba1_groups", "pool"]
)
def test_matches_reference(backend, dtype, case, device):
    args, pool = _inputs(case, on_interpreter(backend), device)
    if case == "mamba2_views":
        # Leaves are the per-head tensors; the step sees their stride-0 expansions.
        args = {**args, "A": args["A"][:, :1, :1].contiguous(), "dt": args["dt"][..., :1].contiguous()}
        args["D"], args["dt_bias"] = args["D"][:, :1].contiguous(), args["dt_bias"][:, :1].contiguous()
    leaves = {name: t.to(dtype).requires_grad_() for name, t in args.items()}
    truth = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    indices = None
    if case == "pool":
        indices = torch.tensor([3, 0], dtype=torch.int32, device=device)

    def run(tensors: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = dict(tensors)
        if case == "mamba2_views":
            nheads, headdim, dstate = inputs["state"].shape[1:]
            batch = inputs["x"].shape[0]
            inputs["A"] = inputs["A"].expand(nheads, headdim, dstate)
            inputs["dt"] = inputs["dt"].expand(batch, nheads, headdim)
            inputs["D"] = inputs["D"].expand(nheads, headdim)
            inputs["dt_bias"] = inputs["dt_bias"].expand(nheads, headdim)
        # The step writes into state: give it a copy so that the leaf keeps the old values.
        state = inputs.pop("state").clone()
        y = selective_state_update(
            state, **inputs, dt_softplus=True, state_batch_indices=indices, backend=backend
        )
        return y, state

    y, state = run(leaves, backend)
    expected_y, expected_state = run(truth, "reference")
    assert y.dtype == dtype and y.shape == args["x"].shape and state.shape[0] == pool
    assert_close(y, expected_y, dtype, name="y")
    assert_close(state, expected_state, dtype, name="state")
    with torch.no_grad():  # the inference path: in place, straight into the state (pool)
        y_inference, state_inference = run(leaves, backend)
    assert_close(y_inference, expected_y, dtype, name="y (no grad)")
    assert_close(state_inference, expected_state, dtype, name="state (no grad)")

    grad_y, grad_state = (
        _rounded(torch.randn_like(expected_y), dtype),
        _rounded(torch.randn_like(expected_state), dtype),
    )
    wrt = [leaves[n] for n in NAMES]
    grads = torch.autograd.grad((y, state), wrt, (grad_y.to(dtype), grad_state.to(dtype)))
    expected_grads = torch.autograd.grad(
        (expected_y, expected_state), [truth[n] for n in NAMES], (grad_y, grad_state)
    )
    for name, grad, expected_grad in zip(NAMES, grads, expected_grads):
        # A, dt, D and dt_bias gradients sum over the batch (and over broadcast dims for views).
        assert_close(grad, expected_grad, dtype, scale=2.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_forms_equal_full_forms(backend, device):
    """A (nheads,), dt (batch, nheads), D and dt_bias (nheads,) mean the per-head value for every
    channel of the head; a stride-0 expansion of them gives the same numbers."""
    args, _ = _inputs("mamba2_heads", on_interpreter(backend), device)
    nheads, headdim, dstate = args["state"].shape[1:]
    batch = args["x"].shape[0]
    full = dict(args)
    full["A"] = args["A"][:, None, None].expand(nheads, headdim, dstate).contiguous()
    full["dt"] = args["dt"][..., None].expand(batch, nheads, headdim).contiguous()
    full["D"] = args["D"][:, None].expand(nheads, headdim).contiguous()
    full["dt_bias"] = args["dt_bias"][:, None].expand(nheads, headdim).contiguous()
    results = []
    for variant in (args, full, _as_views(full)):
        state = variant["state"].clone()
        inputs = {k: v for k, v in variant.items() if k != "state"}
        y = selective_state_update(state, **inputs, dt_softplus=True, backend=backend)
        results.append((y, state))
    for y, state in results[1:]:
        assert_close(y, results[0][0], torch.float64, name="y")
        assert_close(state, results[0][1], torch.float64, name="state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_pool_in_place(backend, device):
    """Without autograd the state pool is updated in place; rows not indexed are untouched; bf16
    inputs with an fp32 state (the usual serving setup) return bf16."""
    args, pool = _inputs("pool", on_interpreter(backend), device)
    state = args.pop("state").float()
    inputs = {k: v.to(torch.bfloat16) for k, v in args.items()}
    indices = torch.tensor([4, 1], dtype=torch.int64, device=device)
    before = state.clone()
    pointer = state.data_ptr()
    with torch.no_grad():
        y = selective_state_update(
            state, **inputs, dt_softplus=True, state_batch_indices=indices, backend=backend
        )
    assert state.data_ptr() == pointer and y.dtype == torch.bfloat16
    assert torch.equal(state[[0, 2, 3]], before[[0, 2, 3]])
    rows = before[indices].double()
    expected_y = selective_state_update(
        rows, **{k: v.double() for k, v in inputs.items()}, dt_softplus=True, backend="reference"
    )
    assert_close(y, expected_y, torch.bfloat16, name="y")
    assert_close(state[indices], rows, torch.bfloat16, name="state")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_tokenwise_equals_selective_scan(backend, ngroups, device):
    """Mamba-1: stepping token by token == selective_scan_fn, output and last state."""
    from ssmkit.ops import selective_scan_fn

    batch, dim, dstate, seqlen = 2, 6, 5, 7
    f64 = dict(device=device, dtype=torch.float64)
    u = torch.randn(batch, dim, seqlen, **f64)
    delta = torch.randn(batch, dim, seqlen, **f64) - 1
    A = -torch.rand(dim, dstate, **f64) - 0.5
    B = torch.randn(batch, ngroups, dstate, seqlen, **f64)
    C = torch.randn(batch, ngroups, dstate, seqlen, **f64)
    D, delta_bias = torch.randn(dim, **f64), torch.randn(dim, **f64) / 2
    z = torch.randn(batch, dim, seqlen, **f64)
    expected, last_state = selective_scan_fn(
        u,
        delta,
        A,
        B if ngroups > 1 else B[:, 0],
        C if ngroups > 1 else C[:, 0],
        D,
        z,
        delta_bias,
        True,
        True,
        backend="reference",
    )
    state = torch.zeros(batch, dim, dstate, **f64)
    ys = []
    for t in range(seqlen):
        B_t = B[..., t] if ngroups > 1 else B[:, 0, :, t]
        C_t = C[..., t] if ngroups > 1 else C[:, 0, :, t]
        ys.append(
            selective_state_update(
                state, u[..., t], delta[..., t], A, B_t, C_t, D, z[..., t], delta_bias, True, backend=backend
            )
        )
    assert_close(torch.stack(ys, dim=-1), expected, torch.float64, name="y")
    assert_close(state, last_state, torch.float64, name="last state")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_tokenwise_equals_chunk_scan(backend, device):
    """Mamba-2: stepping token by token from initial states == mamba_chunk_scan_combined (seqlen not
    a multiple of chunk_size), output and final states."""
    from ssmkit.ops import mamba_chunk_scan_combined

    batch, seqlen, nheads, headdim, ngroups, dstate, chunk_size = 2, 7, 4, 5, 2, 6, 4
    f64 = dict(device=device, dtype=torch.float64)
    x = torch.randn(batch, seqlen, nheads, headdim, **f64)
    dt = torch.randn(batch, seqlen, nheads, **f64) - 1
    A = -torch.rand(nheads, **f64) - 0.5
    B = torch.randn(batch, seqlen, ngroups, dstate, **f64)
    C = torch.randn(batch, seqlen, ngroups, dstate, **f64)
    D, dt_bias = torch.randn(nheads, **f64), torch.randn(nheads, **f64) / 2
    z = torch.randn(batch, seqlen, nheads, headdim, **f64)
    initial = torch.randn(batch, nheads, headdim, dstate, **f64)
    expected, final = mamba_chunk_scan_combined(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        initial_states=initial,
        dt_softplus=True,
        return_final_states=True,
        backend="reference",
    )
    state = initial.clone()
    ys = [
        selective_state_update(
            state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], dt_bias, True, backend=backend
        )
        for t in range(seqlen)
    ]
    assert_close(torch.stack(ys, dim=1), expected, torch.float64, name="y")
    assert_close(state, final, torch.float64, name="final state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokenwise_gradients_through_in_place_updates(backend, device):
    """Backpropagating through a loop of in-place steps equals backpropagating through the
    out-of-place fp64 reference loop (gradients reach every token's inputs and the initial state)."""
    batch, nheads, headdim, dstate, seqlen = 1, 2, 4, 3, 5
    f64 = dict(device=device, dtype=torch.float64)
    xs = torch.randn(seqlen, batch, nheads, headdim, **f64, requires_grad=True)
    dts = (torch.randn(seqlen, batch, nheads, **f64) - 1).requires_grad_()
    A = (-torch.rand(nheads, **f64) - 0.5).requires_grad_()
    Bs = torch.randn(seqlen, batch, 1, dstate, **f64, requires_grad=True)
    Cs = torch.randn(seqlen, batch, 1, dstate, **f64, requires_grad=True)
    initial = torch.randn(batch, nheads, headdim, dstate, **f64, requires_grad=True)

    def loop(backend: str) -> torch.Tensor:
        state = initial.clone()
        ys = [
            selective_state_update(state, xs[t], dts[t], A, Bs[t], Cs[t], dt_softplus=True, backend=backend)
            for t in range(seqlen)
        ]
        return torch.stack(ys).square().sum() + state.sum()

    leaves = (xs, dts, A, Bs, Cs, initial)
    grads = torch.autograd.grad(loop(backend), leaves)
    expected = torch.autograd.grad(loop("reference"), leaves)
    for name, grad, expected_grad in zip(("x", "dt", "A", "B", "C", "initial state"), grads, expected):
        assert_close(grad, expected_grad, torch.float64, name=f"grad {name}")


def _bad_args(**change):
    args = dict(
        state=torch.zeros(2, 3, 4, 5),
        x=torch.ones(2, 3, 4),
        dt=torch.ones(2, 3, 4),
        A=-torch.ones(3, 4, 5),
        B=torch.ones(2, 1, 5),
        C=torch.ones(2, 1, 5),
    )
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            dict(state=torch.zeros(2, 3)),
            ValueError,
            r"state must have shape \(batch, nheads, headdim, dstate\) or",
        ),
        (
            dict(x=torch.ones(2, 3, 5)),
            ValueError,
            r"x must have shape \(batch, nheads, headdim\) = \(\?, 3, 4\)",
        ),
        (
            dict(dt=torch.ones(2, 4)),
            ValueError,
            r"dt must have shape \(batch, nheads, headdim\) = \(2, 3, 4\) or "
            r"\(batch, nheads\) = \(2, 3\), got \(2, 4\)",
        ),
        (dict(A=-torch.ones(3, 4)), ValueError, r"A must have shape .* or \(nheads\) = \(3,\), got \(3, 4\)"),
        (
            dict(B=torch.ones(2, 2, 5), C=torch.ones(2, 2, 5)),
            ValueError,
            r"nheads \(3\) must be divisible by ngroups \(2\)",
        ),
        (
            dict(C=torch.ones(2, 1, 6)),
            ValueError,
            r"C must have shape \(batch, ngroups, dstate\) = \(2, 1, 5\)",
        ),
        (dict(D=torch.ones(4)), ValueError, r"D must have shape"),
        (dict(z=torch.ones(2, 3)), ValueError, r"z must have shape"),
        (dict(dt_bias=torch.ones(3, 5)), ValueError, r"dt_bias must have shape"),
        (dict(state=torch.zeros(3, 3, 4, 5)), ValueError, "state must have batch size 2"),
        (
            dict(state_batch_indices=torch.zeros(3, dtype=torch.int32)),
            ValueError,
            "state_batch_indices must have shape",
        ),
        (
            dict(state_batch_indices=torch.zeros(2)),
            TypeError,
            "state_batch_indices must have an integer dtype",
        ),
        (dict(x=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(A=None), TypeError, "A must be a torch.Tensor, got None"),
        (
            dict(
                state=torch.zeros(2, 6, 5),
                x=torch.ones(2, 6),
                dt=torch.ones(2, 6),
                A=-torch.ones(6, 5),
                B=torch.ones(2, 5),
                C=torch.ones(2, 1, 5),
            ),
            ValueError,
            r"C must have shape \(batch, dstate\) = \(2, 5\)",
        ),
        (
            dict(
                state=torch.zeros(2, 6, 5),
                x=torch.ones(2, 6),
                dt=torch.ones(2, 6),
                A=-torch.ones(6, 5),
                B=torch.ones(2, 4, 5),
                C=torch.ones(2, 4, 5),
            ),
            ValueError,
            r"dim \(6\) must be divisible by ngroups \(4\)",
        ),
        (
            dict(
                state=torch.zeros(2, 6, 5),
                x=torch.ones(2, 6),
                dt=torch.ones(2, 6),
                A=-torch.ones(
                    6,
                ),
                B=torch.ones(2, 5),
                C=torch.ones(2, 5),
            ),
            ValueError,
            r"A must have shape \(dim, dstate\) = \(6, 5\)",
        ),
    ],
)
def test_bad_input(change, error, message):
    with pytest.raises(error, match=message):
        selective_state_update(**_bad_args(**change))


def test_refuses_leaf_state_that_requires_grad():
    state = torch.zeros(2, 3, 4, 5, requires_grad=True)
    with pytest.raises(ValueError, match="state is updated in place"):
        selective_state_update(**_bad_args(state=state))


def test_softplus_and_bias_applied_once():
    """dt' = softplus(dt + dt_bias): a one-channel check against the closed form."""
    state = torch.zeros(1, 1, 1, dtype=torch.float64)
    dt, dt_bias = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([-0.1], dtype=torch.float64)
    y = selective_state_update(
        state,
        torch.ones(1, 1, dtype=torch.float64),
        dt,
        -torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        dt_bias=dt_bias,
        dt_softplus=True,
    )
    step = F.softplus(torch.tensor(0.2, dtype=torch.float64))
    assert torch.allclose(y, step.reshape(1, 1)) and torch.allclose(state, step.reshape(1, 1, 1))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["mamba2", "mamba2_heads", "mamba2_views", "mamba1", "pool"])
def test_A_is_log_equals_explicit_A(backend, dtype, case, device):
    """A_is_log=True with A_log == the step with A = -exp(A_log) passed in: outputs, the state and
    the gradient reaching A_log (what a Mamba layer's decode step passes: its A_log parameter)."""
    args, _ = _inputs(case, on_interpreter(backend), device)
    if case == "mamba2_views":
        args = _as_views(args)
    A_log = torch.log(-args.pop("A"))
    if case == "mamba2_views":
        A_leaf = A_log[:, :1, :1].contiguous().to(dtype).requires_grad_()
        A_arg = lambda leaf: leaf.expand(*A_log.shape)
    else:
        A_leaf = A_log.to(dtype).requires_grad_()
        A_arg = lambda leaf: leaf
    inputs = {name: t.to(dtype) for name, t in args.items()}
    indices = torch.tensor([3, 0], device=device) if case == "pool" else None
    A64 = A_leaf.detach().double().requires_grad_()

    state = inputs.pop("state").clone()
    y = selective_state_update(
        state, **inputs, A=A_arg(A_leaf), dt_softplus=True, state_batch_indices=indices,
        backend=backend, A_is_log=True,
    )  # fmt: skip
    expected_state = args["state"].to(dtype).double().clone()
    expected_y = selective_state_update(
        expected_state, **{k: v.double() for k, v in inputs.items()}, A=-torch.exp(A_arg(A64)),
        dt_softplus=True, state_batch_indices=indices, backend="reference",
    )  # fmt: skip
    assert y.dtype == dtype
    assert_close(y, expected_y, dtype, name="y")
    assert_close(state, expected_state, dtype, name="state")
    # Read as A itself, A_log would give other numbers: the test sees whether the flag is applied.
    assert (-A_log.exp() - A_log).abs().max() > 0.1
    with torch.no_grad():  # the inference path: the kernel updates the state in place
        state_inference = args["state"].to(dtype).clone()
        y_inference = selective_state_update(
            state_inference, **inputs, A=A_arg(A_leaf), dt_softplus=True, state_batch_indices=indices,
            backend=backend, A_is_log=True,
        )  # fmt: skip
    assert_close(y_inference, expected_y, dtype, name="y (no grad)")
    assert_close(state_inference, expected_state, dtype, name="state (no grad)")

    grad_y = _rounded(torch.randn_like(expected_y), dtype)
    (grad,) = torch.autograd.grad(y, A_leaf, grad_y.to(dtype))
    (expected_grad,) = torch.autograd.grad(expected_y, A64, grad_y)
    assert_close(grad, expected_grad, dtype, scale=2.0, name="grad A_log")
