"""Triton gated RMSNorm (``ssmkit::rms_norm_gated_fwd`` / ``_bwd``): what the shared parity tests do
not cover.

The kernels' own backward (the public interface differentiates its Triton forward with the PyTorch
formulas), several row blocks per backward program, strided inputs, every dtype, the custom-op
registrations (opcheck), and on a GPU torch.compile. Ground truth: autograd through the fp64
reference on the same (rounded) input values.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import dispatch
from ssmkit.ops.norm.reference import rms_norm_gated_ref
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(
    not dispatch.triton_importable() or (not torch.cuda.is_available() and not dispatch.triton_interpret()),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)


def _norm():
    from ssmkit.ops.norm.triton import rms_norm_gated_triton

    return rms_norm_gated_triton


# (leading shape, dim, group_size, with z, norm_before_gate)
CASES = [
    ((2, 5), 37, 37, True, True),
    ((2, 5), 37, 37, True, False),
    ((7,), 48, 16, True, False),
    ((3, 2), 72, 24, True, True),
    ((4,), 37, 37, False, True),
    ((700,), 45, 15, True, False),  # several row blocks per backward program
    ((3, 300), 40, 8, False, True),
]


def _check(x, weight, z, group_size, norm_before_gate, dtype, eps=1e-5):
    inputs = [t for t in (x, weight, z) if t is not None]
    truth = [t.detach().double().requires_grad_() for t in inputs]
    z64 = truth[2] if z is not None else None
    out = _norm()(x, weight, z, eps, group_size, norm_before_gate)
    expected = rms_norm_gated_ref(truth[0], truth[1], z64, eps, group_size, norm_before_gate)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected, dtype, name="out")
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, truth, grad_out)
    for name, grad, expected_grad in zip(("x", "weight", "z"), grads, expected_grads):
        assert grad.dtype == dtype
        # weight's gradient sums over every row: allow for the longer reduction.
        assert_close(grad, expected_grad, dtype, scale=2.0 if name == "weight" else 1.0, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead, dim, group_size, with_z, norm_before_gate", CASES)
def test_forward_and_backward(dtype, lead, dim, group_size, with_z, norm_before_gate, device):
    x = torch.randn(*lead, dim, device=device).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(dim, device=device)).to(dtype).requires_grad_()
    z = torch.randn(*lead, dim, device=device).to(dtype).requires_grad_() if with_z else None
    _check(x, weight, z, group_size, norm_before_gate, dtype)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_strided_inputs(norm_before_gate, device):
    """x a transposed view (no reshape to rows possible without a copy), z a column slice."""
    dim = 24
    x = torch.randn(dim, 3, 5, device=device).permute(1, 2, 0).requires_grad_()
    z = torch.randn(3, 5, 2 * dim, device=device)[..., ::2].requires_grad_()
    weight = torch.randn(dim, device=device, requires_grad=True)
    assert not x.is_contiguous() and not z.is_contiguous()
    _check(x, weight, z, 8, norm_before_gate, torch.float32)


def test_mixed_dtypes(device):
    """bf16 activations with an fp32 weight (a common mixed-precision setup)."""
    x = torch.randn(6, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(6, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32, device=device, requires_grad=True)
    out = _norm()(x, weight, z, 1e-5, 16, False)
    expected = rms_norm_gated_ref(x.double(), weight.double(), z.double(), 1e-5, 16, False)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16)
    out.sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_group_too_large_is_rejected(device):
    x = torch.randn(1, 65536, device=device)
    with pytest.raises(ValueError, match="group_size must be at most"):
        _norm()(x, torch.ones(65536, device=device), None, 1e-5, 65536, True)


def test_opcheck(device):
    _norm()  # registers the ops
    x, z = torch.randn(3, 4, 24, device=device), torch.randn(3, 4, 24, device=device)
    weight = torch.randn(24, device=device)
    torch.library.opcheck(torch.ops.ssmkit.rms_norm_gated_fwd.default, (x, weight, z, 1e-5, 8, False))
    torch.library.opcheck(torch.ops.ssmkit.rms_norm_gated_fwd.default, (x, weight, None, 1e-5, 24, True))
    _, rstd = torch.ops.ssmkit.rms_norm_gated_fwd(x, weight, z, 1e-5, 8, True)
    torch.library.opcheck(
        torch.ops.ssmkit.rms_norm_gated_bwd.default, (torch.randn_like(x), x, weight, z, rstd, 8, True)
    )


# On a GPU the compiled graph goes through inductor; on the CPU (Triton interpreter) through
# aot_eager, which still traces the custom op, its fake function and its autograd formula.
def test_compile_fullgraph(device):
    """Forward and backward of the custom ops under torch.compile(fullgraph=True)."""
    x = torch.randn(4, 5, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(4, 5, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(48, device=device, requires_grad=True)
    norm = _norm()
    compiled = torch.compile(
        lambda x, w, z: norm(x, w, z, 1e-5, 16, False),
        fullgraph=True,
        backend="inductor" if device.type == "cuda" else "aot_eager",
    )
    out = compiled(x, weight, z)
    truth = [t.detach().double().requires_grad_() for t in (x, weight, z)]
    expected = rms_norm_gated_ref(truth[0], truth[1], truth[2], 1e-5, 16, False)
    assert_close(out, expected, torch.bfloat16)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (x, weight, z), grad_out.to(torch.bfloat16))
    expected_grads = torch.autograd.grad(expected, truth, grad_out)
    for name, grad, expected_grad in zip(("x", "weight", "z"), grads, expected_grads):
        assert_close(grad, expected_grad, torch.bfloat16, scale=2.0, name=f"grad {name}")


# ------------------------------------------------------------------ fused residual add + RMSNorm
def _add_norm():
    from ssmkit.ops.norm.triton import add_rms_norm_triton

    return add_rms_norm_triton


@pytest.mark.parametrize(
    "rows, dim, x_dtype, residual_dtype, multiplier",
    [
        (1, 37, torch.bfloat16, torch.float32, 1.0),  # batch-1 decode, residual kept in fp32
        (5, 768, torch.bfloat16, torch.bfloat16, 0.246),
        (700, 24, torch.float32, torch.float32, 1.0),  # several row blocks
        (3, 40, torch.float16, torch.float32, 3.0),
        (2, 37, torch.float64, torch.float64, 1.0),
    ],
)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first_block"])
def test_add_rms_norm_matches_unfused_ops(
    rows, dim, x_dtype, residual_dtype, multiplier, with_residual, device
):
    """The kernel against the unfused ops it replaces (``add_rms_norm_ref``, same inputs), on
    strided inputs."""
    from ssmkit.ops.norm.reference import add_rms_norm_ref

    x = torch.randn(dim, rows, device=device).to(x_dtype).t()  # a transposed view
    residual = (
        (2 * torch.randn(rows, 2 * dim, device=device)).to(residual_dtype)[:, ::2] if with_residual else None
    )
    weight = (1 + 0.3 * torch.randn(dim, device=device)).to(x_dtype)
    out, residual_out = _add_norm()(x, residual, weight, 1e-5, multiplier, residual_dtype)
    expected_out, expected_residual = add_rms_norm_ref(x, residual, weight, 1e-5, multiplier, residual_dtype)
    assert out.dtype == x_dtype and residual_out.dtype == residual_dtype
    assert_close(out, expected_out, x_dtype, name="out")
    assert_close(residual_out, expected_residual, residual_dtype if x_dtype != torch.bfloat16 else x_dtype,
                 name="residual")  # fmt: skip


def test_add_rms_norm_interface_fuses_only_without_autograd(monkeypatch, device):
    """No gradient: one fused kernel. Gradients: the differentiable unfused ops."""
    from ssmkit.ops.norm import add_rms_norm
    from ssmkit.ops.norm import triton as norm_triton

    calls = []
    fused = norm_triton.add_rms_norm_triton
    monkeypatch.setattr(norm_triton, "add_rms_norm_triton", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(2, 37, device=device, requires_grad=True)
    residual = torch.randn(2, 37, device=device)
    weight = torch.randn(37, device=device)
    with torch.no_grad():
        add_rms_norm(x, residual, weight, backend="triton")
    assert calls == [1]
    out, _ = add_rms_norm(x, residual, weight, backend="triton")
    out.sum().backward()
    assert calls == [1] and x.grad is not None


def test_add_rms_norm_opcheck(device):
    _add_norm()  # registers the op
    x = torch.randn(3, 24, device=device, dtype=torch.bfloat16)
    residual = torch.randn(3, 24, device=device)
    weight = torch.randn(24, device=device, dtype=torch.bfloat16)
    op = torch.ops.ssmkit.add_rms_norm.default
    torch.library.opcheck(op, (x, residual, weight, 1e-5, 0.5, torch.float32))
    torch.library.opcheck(op, (x, None, weight, 1e-5, 1.0, None))
