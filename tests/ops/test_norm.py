"""(Gated) RMSNorm: fast paths vs the fp64 reference (forward and gradients), grouping, gate order."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import rms_norm, rms_norm_gated
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params("ssmkit.ops.norm")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp64 tensor holding values representable in ``dtype``: both paths then get the same
    cotangent, and the comparison measures the operator alone."""
    return t.to(dtype).double()


# (leading shape, dim, group_size, with z, norm_before_gate)
CASES = [
    ((2, 5), 37, None, True, True),
    ((2, 5), 37, None, True, False),
    ((7,), 48, 16, True, False),
    ((3, 2), 24, 8, True, True),
    ((4,), 37, None, False, True),
    ((2, 3), 45, 15, False, True),
]


def _silu(t: torch.Tensor) -> torch.Tensor:
    return t * torch.sigmoid(t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, dim, group_size, with_z, norm_before_gate", CASES)
def test_matches_reference(backend, dtype, lead, dim, group_size, with_z, norm_before_gate, device):
    x = torch.randn(*lead, dim, device=device, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(dim, device=device, dtype=torch.float64)).to(dtype).requires_grad_()
    z = torch.randn(*lead, dim, device=device).to(dtype).requires_grad_() if with_z else None
    inputs = [t for t in (x, weight, z) if t is not None]
    # Ground truth: autograd through the reference in fp64 on the same (rounded) input values.
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    x64, w64 = truth_inputs[:2]
    z64 = truth_inputs[2] if with_z else None
    kwargs = dict(group_size=group_size, norm_before_gate=norm_before_gate)

    out = rms_norm_gated(x, weight, z, **kwargs, backend=backend)
    expected = rms_norm_gated(x64, w64, z64, **kwargs, backend="reference")
    assert out.dtype == dtype
    assert_close(out, expected, dtype, name="out")

    grad_out = _rounded(torch.randn_like(expected), dtype)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, truth_inputs, grad_out)
    for name, grad, expected_grad in zip(("x", "weight", "z"), grads, expected_grads):
        assert grad.dtype == dtype
        # weight's gradient sums over every row: allow for the longer reduction.
        assert_close(grad, expected_grad, dtype, scale=2.0 if name == "weight" else 1.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_groups_are_independent_norms(backend, norm_before_gate, device):
    """Grouped norm == plain rms_norm applied to each group, with the gate where the order says."""
    dim, group_size = 30, 10
    x = torch.randn(4, dim, device=device, dtype=torch.float64)
    z = torch.randn(4, dim, device=device, dtype=torch.float64)
    weight = torch.randn(dim, device=device, dtype=torch.float64)
    out = rms_norm_gated(x, weight, z, 1e-5, group_size, norm_before_gate, backend=backend)
    pre = x if norm_before_gate else x * _silu(z)
    pieces = [
        rms_norm(pre[:, i : i + group_size], weight[i : i + group_size], 1e-5, backend=backend)
        for i in range(0, dim, group_size)
    ]
    expected = torch.cat(pieces, dim=-1)
    if norm_before_gate:
        expected = expected * _silu(z)
    assert_close(out, expected, torch.float64)
    # The two gate orders really differ (guards against one ignoring norm_before_gate).
    other = rms_norm_gated(x, weight, z, 1e-5, group_size, not norm_before_gate, backend=backend)
    assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_rms_norm_formula(backend, device):
    x = torch.randn(3, 5, 37, device=device, dtype=torch.float64)
    weight = torch.randn(37, device=device, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert_close(rms_norm(x, weight, backend=backend), expected, torch.float64)
    assert_close(rms_norm_gated(x, weight, backend=backend), expected, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_mixed_dtypes(backend, device):
    """A transposed (non-contiguous) bf16 x with an fp32 weight: bf16 out, fp32 compute."""
    x = torch.randn(37, 6, device=device).to(torch.bfloat16).t()
    z = torch.randn(37, 6, device=device).to(torch.bfloat16).t()
    weight = torch.randn(37, device=device)
    out = rms_norm_gated(x, weight, z, group_size=None, norm_before_gate=False, backend=backend)
    expected = rms_norm_gated(
        x.double(), weight.double(), z.double(), norm_before_gate=False, backend="reference"
    )
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(weight=torch.ones(36)), ValueError, r"weight must have shape \(dim\) = \(37,\), got \(36,\)"),
        (dict(z=torch.ones(2, 36)), ValueError, r"z must have the shape of x \(2, 37\), got \(2, 36\)"),
        (dict(group_size=5), ValueError, r"dim \(37\) must be divisible by group_size \(5\)"),
        (dict(group_size=0), ValueError, "group_size must be a positive int"),
        (dict(x=torch.ones(2, 37, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(z=torch.ones(2, 37, dtype=torch.int32)), TypeError, "z must have a floating dtype"),
        (dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor, got list"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(change, error, message):
    args = dict(x=torch.ones(2, 37), weight=torch.ones(37), z=None, eps=1e-6, group_size=None, backend=None)
    args.update(change)
    with pytest.raises(error, match=message):
        rms_norm_gated(**args)
