"""Causal conv1d: fast paths vs the fp64 reference (forward and gradients), packed sequences,
state chaining, and the decode step against the full convolution."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import causal_conv1d_fn, causal_conv1d_update
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params("ssmkit.ops.conv1d")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp64 tensor holding values representable in ``dtype``: both paths then get the same
    cotangent, and the comparison measures the operator alone."""
    return t.to(dtype).double()


def _seq_idx(lengths: list[int], device: torch.device) -> torch.Tensor:
    """seq_idx (1, sum(lengths)) for sequences of the given lengths packed in one row."""
    ids = [torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)]
    return torch.cat(ids).unsqueeze(0).to(device)


def _leaf(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).requires_grad_()


# (batch, dim, seqlen, width, with bias, activation, sequence lengths in a row or None, with initial states)
FN_CASES = [
    (2, 37, 19, 4, True, "silu", None, False),
    (1, 5, 33, 3, False, None, [10, 1, 22], True),
    (3, 8, 7, 2, True, "swish", None, True),
    (1, 6, 2, 4, True, "silu", [1, 1], True),
    (2, 11, 13, 4, True, None, [6, 7], False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, dim, seqlen, width, with_bias, activation, lengths, with_initial", FN_CASES)
def test_fn_matches_reference(
    backend, dtype, batch, dim, seqlen, width, with_bias, activation, lengths, with_initial, device
):
    x = torch.randn(batch, dim, seqlen, device=device, dtype=torch.float64)
    weight = torch.randn(dim, width, device=device, dtype=torch.float64) / width**0.5
    bias = torch.randn(dim, device=device, dtype=torch.float64) if with_bias else None
    initial = torch.randn(batch, dim, width - 1, device=device, dtype=torch.float64) if with_initial else None
    seq_idx = None if lengths is None else _seq_idx(lengths, device).expand(batch, -1).contiguous()
    inputs = [_leaf(t, dtype) for t in (x, weight, bias, initial)]
    # Ground truth: autograd through the reference in fp64 on the same (rounded) values.
    truth = [None if t is None else t.detach().double().requires_grad_() for t in inputs]

    out, final = causal_conv1d_fn(
        inputs[0], inputs[1], inputs[2], seq_idx, inputs[3], True, activation, backend=backend
    )
    expected, expected_final = causal_conv1d_fn(
        truth[0], truth[1], truth[2], seq_idx, truth[3], True, activation, backend="reference"
    )
    assert out.dtype == dtype and final.dtype == dtype
    assert_close(out, expected, dtype, name="out")
    assert_close(final, expected_final, dtype, name="final_states")

    grad_out = _rounded(torch.randn_like(expected), dtype)
    grad_final = _rounded(torch.randn_like(expected_final), dtype)
    wrt = [t for t in inputs if t is not None]
    grads = torch.autograd.grad((out, final), wrt, (grad_out.to(dtype), grad_final.to(dtype)))
    expected_grads = torch.autograd.grad(
        (expected, expected_final), [t for t in truth if t is not None], (grad_out, grad_final)
    )
    names = [n for n, t in zip(("x", "weight", "bias", "initial_states"), inputs) if t is not None]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert_close(grad, expected_grad, dtype, scale=2.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_width_one_is_pointwise(backend, device):
    x = torch.randn(2, 5, 9, device=device, dtype=torch.float64)
    weight = torch.randn(5, 1, device=device, dtype=torch.float64)
    out, final = causal_conv1d_fn(x, weight, return_final_states=True, backend=backend)
    assert_close(out, x * weight, torch.float64)
    assert final.shape == (2, 5, 0)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("width", [2, 4])
def test_seq_idx_equals_separate_sequences(backend, width, device):
    """A packed row gives what its sequences give one by one; the first one continues from
    initial_states, and final_states is the history of the last one."""
    dim, lengths = 7, [5, 1, 2, 9]
    x = torch.randn(1, dim, sum(lengths), device=device, dtype=torch.float64)
    weight = torch.randn(dim, width, device=device, dtype=torch.float64)
    bias = torch.randn(dim, device=device, dtype=torch.float64)
    initial = torch.randn(1, dim, width - 1, device=device, dtype=torch.float64)
    seq_idx = _seq_idx(lengths, device)
    out, final = causal_conv1d_fn(x, weight, bias, seq_idx, initial, True, "silu", backend=backend)

    pieces, start = [], 0
    for i, n in enumerate(lengths):
        history = initial if i == 0 else None
        piece, piece_final = causal_conv1d_fn(
            x[:, :, start : start + n], weight, bias, None, history, True, "silu", backend="reference"
        )
        pieces.append(piece)
        start += n
    assert_close(out, torch.cat(pieces, dim=-1), torch.float64, name="out")
    assert_close(final, piece_final, torch.float64, name="final_states")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("split", [1, 2, 6])
def test_state_chaining_equals_one_pass(backend, split, device):
    """Two calls chained through final_states -> initial_states == one call (also for a first
    piece shorter than width - 1)."""
    dim, seqlen, width = 9, 11, 4
    x = torch.randn(2, dim, seqlen, device=device, dtype=torch.float64)
    weight = torch.randn(dim, width, device=device, dtype=torch.float64)
    initial = torch.randn(2, dim, width - 1, device=device, dtype=torch.float64)
    whole, whole_final = causal_conv1d_fn(x, weight, None, None, initial, True, backend=backend)
    first, carried = causal_conv1d_fn(x[:, :, :split], weight, None, None, initial, True, backend=backend)
    second, final = causal_conv1d_fn(x[:, :, split:], weight, None, None, carried, True, backend=backend)
    assert_close(torch.cat([first, second], dim=-1), whole, torch.float64, name="out")
    assert_close(final, whole_final, torch.float64, name="final_states")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("extra_state, step", [(0, 1), (3, 1), (2, 3)])
def test_update_token_by_token_equals_full_conv(backend, dtype, extra_state, step, device):
    """Decode steps (one token with 2-D x, or several with 3-D x) reproduce the full convolution,
    and the rolled conv_state holds the last state_len inputs; gradients (to x, weight, bias and the
    initial state, through the in-place updates) match the full convolution's in fp64."""
    batch, dim, seqlen, width = 2, 13, 9, 4
    state_len = width - 1 + extra_state
    x = torch.randn(batch, dim, seqlen, device=device, dtype=torch.float64)
    weight = torch.randn(dim, width, device=device, dtype=torch.float64) / 2
    bias = torch.randn(dim, device=device, dtype=torch.float64)
    history = torch.randn(batch, dim, state_len, device=device, dtype=torch.float64)
    x_d, w_d, b_d, h_d = (t.to(dtype).requires_grad_() for t in (x, weight, bias, history))

    conv_state = h_d.clone()  # the in-place updates must not touch the leaf
    outs = []
    for t in range(0, seqlen, step):
        chunk = x_d[:, :, t] if step == 1 else x_d[:, :, t : t + step]
        out = causal_conv1d_update(chunk, conv_state, w_d, b_d, "silu", backend=backend)
        outs.append(out.unsqueeze(-1) if step == 1 else out)
    out = torch.cat(outs, dim=-1)

    truth = [t.detach().to(dtype).double().requires_grad_() for t in (x, weight, bias, history)]
    initial = truth[3][:, :, state_len - (width - 1) :]
    expected = causal_conv1d_fn(
        truth[0], truth[1], truth[2], None, initial, False, "silu", backend="reference"
    )
    expected_state = torch.cat([truth[3], truth[0]], dim=-1)[:, :, -state_len:]
    assert out.dtype == dtype and conv_state.dtype == dtype
    assert_close(out, expected, dtype, name="out")
    assert_close(conv_state, expected_state, dtype, name="conv_state")

    grad_out, grad_state = (
        _rounded(torch.randn_like(expected), dtype),
        _rounded(torch.randn_like(expected_state), dtype),
    )
    grads = torch.autograd.grad(
        (out, conv_state), (x_d, w_d, b_d, h_d), (grad_out.to(dtype), grad_state.to(dtype))
    )
    expected_grads = torch.autograd.grad((expected, expected_state), truth, (grad_out, grad_state))
    for name, grad, expected_grad in zip(("x", "weight", "bias", "state"), grads, expected_grads):
        assert_close(grad, expected_grad, dtype, scale=2.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_update_with_state_indices(backend, device):
    """Row i updates pool row conv_state_indices[i]; the other pool rows are untouched."""
    pool, dim, width, state_len = 5, 6, 3, 4
    conv_state = torch.randn(pool, dim, state_len, device=device)
    weight = torch.randn(dim, width, device=device)
    x = torch.randn(3, dim, device=device)
    indices = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    before = conv_state.clone()
    out = causal_conv1d_update(x, conv_state, weight, None, None, indices, backend=backend)

    gathered = before[indices.long()].clone()
    expected = causal_conv1d_update(x, gathered, weight, backend="reference")
    assert_close(out, expected, torch.float32, name="out")
    assert_close(conv_state[indices.long()], gathered, torch.float32, name="updated rows")
    untouched = [1, 3]
    assert torch.equal(conv_state[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_without_grad_is_in_place(backend, device):
    """Inference path: the very tensor passed in is updated, and nothing else is needed."""
    conv_state = torch.zeros(2, 4, 3, device=device)
    pointer = conv_state.data_ptr()
    weight = torch.ones(4, 4, device=device)
    x = torch.arange(8.0, device=device).view(2, 4)
    with torch.no_grad():
        out = causal_conv1d_update(x, conv_state, weight, backend=backend)
    assert conv_state.data_ptr() == pointer
    assert torch.equal(conv_state[:, :, -1], x) and torch.equal(out, x)


def _fn_args(**change):
    args = dict(
        x=torch.ones(2, 8, 10),
        weight=torch.ones(8, 4),
        bias=None,
        seq_idx=None,
        initial_states=None,
        return_final_states=False,
        activation=None,
    )
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=torch.ones(2, 8)), ValueError, r"x must have shape \(batch, dim, seqlen\)"),
        (
            dict(weight=torch.ones(7, 4)),
            ValueError,
            r"weight must have shape \(dim, width\) = \(8, \?\), got \(7, 4\)",
        ),
        (dict(bias=torch.ones(4)), ValueError, r"bias must have shape \(dim\) = \(8,\), got \(4,\)"),
        (dict(seq_idx=torch.zeros(2, 9, dtype=torch.int32)), ValueError, "seq_idx must have shape"),
        (dict(seq_idx=torch.zeros(2, 10)), TypeError, "seq_idx must have an integer dtype"),
        (
            dict(initial_states=torch.ones(2, 8, 4)),
            ValueError,
            r"initial_states must have shape .* = \(2, 8, 3\)",
        ),
        (
            dict(initial_states=torch.ones(2, 8, 3, dtype=torch.int64)),
            TypeError,
            "initial_states must have a floating dtype",
        ),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(x=torch.ones(2, 8, 10, dtype=torch.int32)), TypeError, "x must have a floating dtype"),
    ],
)
def test_fn_bad_input(change, error, message):
    with pytest.raises(error, match=message):
        causal_conv1d_fn(**_fn_args(**change))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=torch.ones(2)), ValueError, r"x must have shape \(batch, dim\) or"),
        (
            dict(conv_state=torch.ones(2, 8, 2)),
            ValueError,
            r"conv_state must have state_len >= width - 1 = 3",
        ),
        (
            dict(conv_state=torch.ones(3, 8, 3)),
            ValueError,
            r"conv_state must have shape \(batch, dim, state_len\)",
        ),
        (dict(conv_state=torch.ones(2, 7, 3)), ValueError, r"conv_state must have shape"),
        (
            dict(conv_state_indices=torch.zeros(3, dtype=torch.int64)),
            ValueError,
            "conv_state_indices must have shape",
        ),
        (dict(conv_state_indices=torch.zeros(2)), TypeError, "conv_state_indices must have an integer dtype"),
        (dict(weight=torch.ones(8, 4, 1)), ValueError, "weight must have shape"),
        (dict(activation="gelu"), ValueError, "activation must be one of"),
    ],
)
def test_update_bad_input(change, error, message):
    args = dict(x=torch.ones(2, 8), conv_state=torch.zeros(2, 8, 3), weight=torch.ones(8, 4))
    args.update(change)
    with pytest.raises(error, match=message):
        causal_conv1d_update(**args)


def test_update_refuses_leaf_state_that_requires_grad():
    conv_state = torch.zeros(2, 8, 3, requires_grad=True)
    with pytest.raises(ValueError, match="conv_state is updated in place"):
        causal_conv1d_update(torch.ones(2, 8), conv_state, torch.ones(8, 4))
