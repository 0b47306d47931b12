"""(Gated) RMSNorm: fast paths vs the fp64 reference (forward and gradients), grouping, gate order;
the pre-norm residual step ``add_rms_norm`` against its formula."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import rms_norm, rms_norm_gated
from ssmkit.ops.norm import add_rms_norm
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


# (leading shape, dim, x dtype, residual dtype or None, weight dtype, multiplier, residual_dtype)
ADD_CASES = [
    ((2, 5), 37, torch.float32, torch.float32, torch.float32, 1.0, None),
    ((3,), 37, torch.bfloat16, torch.float32, torch.bfloat16, 1.0, torch.float32),  # residual_in_fp32
    ((1, 1), 48, torch.bfloat16, torch.bfloat16, torch.bfloat16, 0.246, None),  # Granite's multiplier
    ((4,), 24, torch.bfloat16, None, torch.bfloat16, 1.0, torch.float32),  # the first block: a cast
    ((2, 3), 45, torch.float32, None, torch.float32, 1.0, None),  # nothing to add: x is the residual
    ((2,), 37, torch.float64, torch.float64, torch.float64, 0.5, None),
    ((2,), 37, torch.float32, torch.float32, torch.bfloat16, 2.0, torch.float32),  # norm in bf16
]


def _add_rms_norm_formula(x, residual, weight, eps, multiplier, residual_dtype):
    """fp64 formula with the roundings of the unfused ops: the sum in residual_dtype, the norm's
    input in weight's dtype."""
    total = multiplier * x.double() + (0 if residual is None else residual.double())
    total = total.to(residual_dtype).double()
    values = total.to(weight.dtype).double()
    out = values / torch.sqrt(values.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out, total


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("lead, dim, x_dtype, r_dtype, w_dtype, multiplier, residual_dtype", ADD_CASES)
def test_add_rms_norm_formula(
    backend, lead, dim, x_dtype, r_dtype, w_dtype, multiplier, residual_dtype, device
):
    x = torch.randn(*lead, dim, device=device).to(x_dtype)
    residual = None if r_dtype is None else (3 * torch.randn(*lead, dim, device=device)).to(r_dtype)
    weight = (1 + 0.3 * torch.randn(dim, device=device)).to(w_dtype)
    with torch.no_grad():  # the inference path (one fused kernel on the Triton backend)
        out, residual_out = add_rms_norm(
            x, residual, weight, 1e-5, multiplier=multiplier, residual_dtype=residual_dtype, backend=backend
        )
    expected_dtype = residual_dtype or (x_dtype if r_dtype is None else torch.promote_types(r_dtype, x_dtype))
    expected_out, expected_residual = _add_rms_norm_formula(
        x, residual, weight, 1e-5, multiplier, expected_dtype
    )
    assert out.dtype == w_dtype and residual_out.dtype == expected_dtype
    assert out.shape == residual_out.shape == x.shape
    # The formula rounds where the ops round: what is left is the norm's reduction order, and
    # roundings of values that land on either side of a tie in the lower of the two precisions.
    assert_close(out, expected_out, max((x_dtype, w_dtype), key=lambda d: torch.finfo(d).eps), name="out")
    assert_close(residual_out, expected_residual, expected_dtype, name="residual")
    if r_dtype is None and multiplier == 1.0 and expected_dtype == x_dtype:
        assert residual_out is x  # nothing to add or convert: no copy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_gradients(backend, dtype, device):
    """With autograd recording, every backend runs the unfused differentiable ops."""
    x = torch.randn(3, 37, device=device).to(dtype).requires_grad_()
    residual = torch.randn(3, 37, device=device, dtype=torch.float64).requires_grad_()
    weight = (1 + 0.3 * torch.randn(37, device=device)).to(dtype).requires_grad_()
    residual_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = (x, residual, weight)
    out, residual_out = add_rms_norm(
        x,
        residual.to(residual_dtype),
        weight,
        1e-5,
        multiplier=0.5,
        residual_dtype=residual_dtype,
        backend=backend,
    )
    truth = [t.detach().double().requires_grad_() for t in leaves]
    expected_out, expected_residual = add_rms_norm(*truth, 1e-5, multiplier=0.5, backend="reference")
    grads_out = (_rounded(torch.randn_like(expected_out), dtype), torch.randn_like(expected_residual))
    grads = torch.autograd.grad(
        (out, residual_out), leaves, (grads_out[0].to(dtype), grads_out[1].to(residual_dtype))
    )
    expected_grads = torch.autograd.grad((expected_out, expected_residual), truth, grads_out)
    for name, grad, expected_grad in zip(("x", "residual", "weight"), grads, expected_grads):
        assert_close(grad, expected_grad, dtype, scale=2.0, name=f"grad {name}")


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(weight=torch.ones(36)), ValueError, r"weight must have shape \(dim\) = \(37,\), got \(36,\)"),
        (dict(residual=torch.ones(2, 36)), ValueError, r"residual must have the shape of x \(2, 37\)"),
        (dict(residual_dtype=torch.int32), ValueError, "residual_dtype must be a floating torch.dtype"),
        (dict(multiplier="2"), ValueError, "multiplier must be a number"),
        (dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
        (dict(x=torch.ones(2, 37, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
    ],
)
def test_add_rms_norm_bad_input(change, error, message):
    args = dict(x=torch.ones(2, 37), residual=torch.ones(2, 37), weight=torch.ones(37), eps=1e-6)
    args.update(change)
    with pytest.raises(error, match=message):
        add_rms_norm(**args)
