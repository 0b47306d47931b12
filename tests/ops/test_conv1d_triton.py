"""Triton causal conv1d (``ssmkit::causal_conv1d_fwd`` / ``_bwd`` / ``_update``): what the shared
parity tests do not cover.

The kernels' own backward (the interface's tests reach it too) with gradients arriving through the
final states, sequences shorter than the history, several position tiles per program, channel-last
and strided layouts, every dtype, the decode kernel on a state pool, the custom-op registrations
(opcheck), and on a GPU torch.compile and CUDA-graph capture. Ground truth: autograd through the
fp64 reference on the same (rounded) input values.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import dispatch
from ssmkit.ops.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(
    not dispatch.triton_importable() or (not torch.cuda.is_available() and not dispatch.triton_interpret()),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)


def _kernels():
    from ssmkit.ops.conv1d import triton as kernels

    return kernels


def _make_x(batch, dim, seqlen, dtype, layout, device):
    """x (batch, dim, seqlen) as a contiguous tensor, a channel-last view, or a strided slice."""
    if layout == "channel_last":
        return torch.randn(batch, seqlen, dim, device=device).to(dtype).transpose(1, 2)
    if layout == "strided":
        return torch.randn(batch, 2 * dim, seqlen + 3, device=device).to(dtype)[:, ::2, 1 : seqlen + 1]
    return torch.randn(batch, dim, seqlen, device=device).to(dtype)


def _packed_seq_idx(batch, seqlen, device):
    """Row 0 holds three sequences (lengths seqlen // 3, 1, rest); row 1 two; others one."""
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    seq_idx[0, seqlen // 3 :] = 1
    seq_idx[0, seqlen // 3 + 1 :] = 2
    if batch > 1:
        seq_idx[1, seqlen - 2 :] = 7
    return seq_idx


# (batch, dim, seqlen, width, bias, activation, seq_idx, initial states, layout)
CASES = [
    (2, 37, 19, 4, True, "silu", True, True, "contiguous"),
    (2, 37, 19, 3, False, None, False, False, "channel_last"),
    (3, 8, 2, 4, True, "silu", False, True, "contiguous"),  # seqlen < width - 1
    (2, 5, 2, 4, True, None, True, True, "contiguous"),  # seqlen < width - 1 with two sequences
    (2, 24, 140, 4, True, "silu", True, True, "channel_last"),  # several tiles per program
    (1, 13, 70, 2, True, "silu", True, False, "strided"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "batch, dim, seqlen, width, with_bias, activation, with_seq_idx, with_initial, layout", CASES
)
def test_fn_forward_and_backward(
    dtype, batch, dim, seqlen, width, with_bias, activation, with_seq_idx, with_initial, layout, device
):
    if dtype == torch.float16 and seqlen > 100:
        pytest.skip("fp16 is covered on the short cases; the long one is slow on the interpreter")
    x = _make_x(batch, dim, seqlen, dtype, layout, device).requires_grad_()
    weight = torch.randn(dim, width, device=device).to(dtype).requires_grad_()
    bias = torch.randn(dim, device=device).to(dtype).requires_grad_() if with_bias else None
    initial = (
        torch.randn(batch, dim, width - 1, device=device).to(dtype).requires_grad_() if with_initial else None
    )
    seq_idx = _packed_seq_idx(batch, seqlen, device) if with_seq_idx else None
    inputs = [t for t in (x, weight, bias, initial) if t is not None]
    truth = [t.detach().double().requires_grad_() for t in inputs]
    truth_iter = iter(truth)
    x64, w64 = next(truth_iter), next(truth_iter)
    b64 = next(truth_iter) if with_bias else None
    i64 = next(truth_iter) if with_initial else None

    expected_out, expected_final = causal_conv1d_ref(x64, w64, b64, seq_idx, i64, activation)
    out, final = _kernels().causal_conv1d_fn_triton(x, weight, bias, seq_idx, initial, True, activation)
    assert out.dtype == dtype and final.dtype == dtype
    assert_close(out, expected_out, dtype, name="out")
    assert_close(final, expected_final, dtype, name="final_states")

    # Gradients through both outputs: final_states feeds the next chunk in chunked prefill.
    grad_out, grad_final = torch.randn_like(expected_out), torch.randn_like(expected_final)
    grads = torch.autograd.grad([out, final], inputs, [grad_out.to(dtype), grad_final.to(dtype)])
    expected = torch.autograd.grad([expected_out, expected_final], truth, [grad_out, grad_final])
    names = ["x", "weight"] + (["bias"] if with_bias else []) + (["initial_states"] if with_initial else [])
    for name, grad, expected_grad in zip(names, grads, expected):
        assert grad.dtype == dtype
        # weight and bias gradients sum over batch and positions: allow for the longer reduction.
        scale = 2.0 if name in ("weight", "bias") else 1.0
        assert_close(grad, expected_grad, dtype, scale=scale, name=f"grad {name}")


def test_fn_gradient_without_final_states(device):
    """Only out is used: the backward runs without a final-state gradient."""
    x = torch.randn(2, 9, 11, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, device=device, dtype=torch.float64, requires_grad=True)
    out, final = _kernels().causal_conv1d_fn_triton(x, weight, None, None, None, False, "silu")
    assert final is None
    expected, _ = causal_conv1d_ref(x, weight, None, None, None, "silu")
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (x, weight), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, weight), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, torch.float64)


# (batch, pool, dim, width, state_len, seqlen_step)
UPDATE_CASES = [
    (3, 3, 37, 4, 3, 1),
    (3, 6, 37, 4, 5, 2),  # state longer than the window, pool larger than the batch
    (2, 4, 8, 3, 2, 5),  # more new inputs than the state holds
    (1, 1, 16, 2, 1, 1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch, pool, dim, width, state_len, seqlen_step", UPDATE_CASES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update(dtype, batch, pool, dim, width, state_len, seqlen_step, activation, device):
    x = torch.randn(batch, dim, seqlen_step, device=device).to(dtype)
    weight = torch.randn(dim, width, device=device).to(dtype)
    bias = torch.randn(dim, device=device).to(dtype)
    conv_state = torch.randn(pool, dim, state_len, device=device).to(dtype)
    indices = torch.randperm(pool, device=device)[:batch].to(torch.int32) if pool > batch else None
    rows = indices.long() if indices is not None else torch.arange(batch, device=device)
    expected_out, expected_state = causal_conv1d_update_ref(
        x.double(), conv_state[rows].double(), weight.double(), bias.double(), activation
    )
    before = conv_state.clone()
    out = _kernels().causal_conv1d_update_triton(x, conv_state, weight, bias, activation, indices)
    assert out.dtype == dtype and conv_state.dtype == dtype
    assert_close(out, expected_out, dtype, name="out")
    # The new state holds old and new inputs, exactly.
    assert torch.equal(conv_state[rows], expected_state.to(dtype))
    untouched = torch.ones(pool, dtype=torch.bool, device=device)
    untouched[rows] = False
    assert torch.equal(conv_state[untouched], before[untouched])


def test_update_matches_full_convolution(device):
    """Ten single steps from a zero state give the full causal convolution's outputs and final state."""
    batch, dim, width, seqlen = 2, 12, 4, 10
    x = torch.randn(batch, dim, seqlen, device=device)
    weight, bias = torch.randn(dim, width, device=device), torch.randn(dim, device=device)
    conv_state = torch.zeros(batch, dim, width - 1, device=device)
    steps = [
        _kernels().causal_conv1d_update_triton(x[:, :, t : t + 1], conv_state, weight, bias, "silu", None)
        for t in range(seqlen)
    ]
    expected, expected_final = causal_conv1d_ref(x, weight, bias, None, None, "silu")
    assert_close(torch.cat(steps, dim=-1), expected, torch.float32)
    assert torch.equal(conv_state, expected_final)


def test_update_strided(device):
    """Non-contiguous x and a conv_state that is a strided view of a larger buffer."""
    batch, dim, width, state_len = 2, 10, 4, 3
    x = torch.randn(batch, 1, dim, device=device).transpose(1, 2)
    buffer = torch.randn(batch, state_len + 2, dim, device=device)
    conv_state = buffer.transpose(1, 2)[:, :, 1 : state_len + 1]
    weight = torch.randn(width, dim, device=device).t()
    expected_out, expected_state = causal_conv1d_update_ref(x, conv_state.clone(), weight, None, None)
    untouched = (buffer[:, 0].clone(), buffer[:, -1].clone())
    out = _kernels().causal_conv1d_update_triton(x, conv_state, weight, None, None, None)
    assert_close(out, expected_out, torch.float32)
    assert torch.equal(conv_state, expected_state)
    assert torch.equal(buffer[:, 0], untouched[0]) and torch.equal(buffer[:, -1], untouched[1])


def test_opcheck(device):
    kernels = _kernels()  # registers the ops
    x = torch.randn(2, 6, 9, device=device)
    weight, bias = torch.randn(6, 4, device=device), torch.randn(6, device=device)
    initial = torch.randn(2, 6, 3, device=device)
    seq_idx = _packed_seq_idx(2, 9, device)
    torch.library.opcheck(
        torch.ops.ssmkit.causal_conv1d_fwd.default, (x, weight, bias, seq_idx, initial, True)
    )
    torch.library.opcheck(torch.ops.ssmkit.causal_conv1d_fwd.default, (x, weight, None, None, None, False))
    dout, dfinal = torch.randn_like(x), torch.randn(2, 6, 3, device=device)
    torch.library.opcheck(
        torch.ops.ssmkit.causal_conv1d_bwd.default, (x, weight, bias, seq_idx, initial, dout, dfinal, True)
    )
    conv_state = torch.randn(3, 6, 3, device=device)
    indices = torch.tensor([2, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(
        torch.ops.ssmkit.causal_conv1d_update.default, (x[:, :, :1], conv_state, weight, bias, True, indices)
    )
    assert kernels.causal_conv1d_fn_triton is not None


# On a GPU the compiled graph goes through inductor; on the CPU (Triton interpreter) through
# aot_eager, which still traces the custom op, its fake function and its autograd formula.
def test_compile_fullgraph(device):
    """Forward and backward of the custom op under torch.compile(fullgraph=True)."""
    x = torch.randn(2, 16, 40, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 4, device=device, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(2, 16, 3, device=device, dtype=torch.float64, requires_grad=True)
    entry = _kernels().causal_conv1d_fn_triton
    compiled = torch.compile(
        lambda x, w, h: entry(x, w, None, None, h, True, "silu"),
        fullgraph=True,
        backend="inductor" if device.type == "cuda" else "aot_eager",
    )
    out, final = compiled(x, weight, initial)
    expected, expected_final = causal_conv1d_ref(x, weight, None, None, initial, "silu")
    assert_close(out, expected, torch.float64, name="out")
    assert_close(final, expected_final, torch.float64, name="final_states")
    grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
    grads = torch.autograd.grad([out, final], [x, weight, initial], [grad_out, grad_final])
    expected_grads = torch.autograd.grad(
        [expected, expected_final], [x, weight, initial], [grad_out, grad_final]
    )
    for name, grad, expected_grad in zip(("x", "weight", "initial_states"), grads, expected_grads):
        assert_close(grad, expected_grad, torch.float64, name=f"grad {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_update_cuda_graph(device):
    batch, dim, width = 4, 64, 4
    x = torch.randn(batch, dim, 1, device=device)
    weight, bias = torch.randn(dim, width, device=device), torch.randn(dim, device=device)
    conv_state = torch.randn(batch, dim, width - 1, device=device)
    expected_state = conv_state.clone().double()
    for _ in range(3):
        expected_out, expected_state = causal_conv1d_update_ref(
            x.double(), expected_state, weight.double(), bias.double(), "silu"
        )
    _kernels().causal_conv1d_update_triton(x, conv_state.clone(), weight, bias, "silu", None)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _kernels().causal_conv1d_update_triton(x, conv_state, weight, bias, "silu", None)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert_close(out, expected_out, torch.float32)
    assert_close(conv_state, expected_state, torch.float32)
