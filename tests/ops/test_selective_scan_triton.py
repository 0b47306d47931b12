"""Triton-specific tests of the fused selective scan: every feature against the sequential reference
(forward and gradients, fp64 autograd through the reference as ground truth), the associative-scan
path itself under the interpreter, strides, packed sequences, custom-op registration, torch.compile.

Shapes are tiny on the CPU interpreter and GPU-sized on a GPU (``on_interpreter``).
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import dispatch
from tests.helpers import assert_close, device_for_tests, on_interpreter

pytestmark = pytest.mark.skipif(
    not dispatch.triton_importable() or (not torch.cuda.is_available() and not dispatch.triton_interpret()),
    reason="needs triton and a CUDA device or TRITON_INTERPRET=1",
)

INTERPRETER = on_interpreter("triton")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _triton():
    from ssmkit.ops.selective_scan import triton as kernels

    return kernels


def _reference():
    from ssmkit.ops.selective_scan.reference import selective_scan_reference

    return selective_scan_reference


def make_inputs(
    batch,
    dim,
    dstate,
    seqlen,
    ngroups,
    dtype,
    device,
    *,
    with_d=True,
    with_z=True,
    with_bias=True,
    with_initial=True,
    num_states=None,
):
    """Inputs in Mamba's dtypes: activations in ``dtype``; A, D, delta_bias in fp32 unless fp64."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator(device="cpu").manual_seed(1234)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    inputs = {
        "u": randn(batch, dim, seqlen),
        "delta": randn(batch, dim, seqlen, scale=0.5),
        # Negative real A like Mamba's -exp(A_log), spread so that decays differ across dstate.
        "A": -(torch.rand(dim, dstate, generator=g, dtype=torch.float64) * 2 + 0.1).to(device, param_dtype),
        "B": randn(batch, ngroups, dstate, seqlen),
        "C": randn(batch, ngroups, dstate, seqlen),
        "D": randn(dim, dt=param_dtype) if with_d else None,
        "z": randn(batch, dim, seqlen) if with_z else None,
        "delta_bias": randn(dim, scale=0.3, dt=param_dtype) if with_bias else None,
        "initial_state": randn(num_states or batch, dim, dstate, dt=param_dtype) if with_initial else None,
    }
    return inputs


def run_both(inputs, *, delta_softplus=True, cu_seqlens=None, with_last_grad=True):
    """Forward and gradients through the kernels and through the fp64 reference (same inputs upcast);
    returns (kernel results, reference results), each a dict name -> tensor."""
    kernels = _triton()
    reference = _reference()
    results = []
    for impl in ("triton", "reference"):
        leaves = {}
        for name, value in inputs.items():
            if value is None:
                leaves[name] = None
                continue
            value = value.detach().clone() if impl == "triton" else value.detach().double()
            leaves[name] = value.requires_grad_(True)
        args = [leaves[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        if impl == "triton":
            out, last = kernels.selective_scan_triton(
                *args, delta_softplus, True, leaves["initial_state"], cu_seqlens
            )
        else:
            out, last = reference(
                *args,
                delta_softplus=delta_softplus,
                return_last_state=True,
                initial_state=leaves["initial_state"],
                cu_seqlens=cu_seqlens,
            )
        gen = torch.Generator(device="cpu").manual_seed(99)
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
        dlast = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(out.device)
        loss = (out.double() * dout).sum()
        if with_last_grad:
            loss = loss + (last.double() * dlast).sum()
        present = [n for n in NAMES if leaves[n] is not None]
        grads = torch.autograd.grad(loss, [leaves[n] for n in present])
        result = {"out": out.detach(), "last_state": last.detach()}
        result.update({f"d{n}": grad for n, grad in zip(present, grads)})
        results.append(result)
    return results


def check_all(kernel, expected, dtype, scale=1.0):
    for name, value in expected.items():
        assert name in kernel, f"{name} missing from the kernel results"
        assert_close(kernel[name], value, dtype, scale=scale, name=name)


def sizes(interpreter_sizes, gpu_sizes):
    return interpreter_sizes if INTERPRETER else gpu_sizes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_all_features_match_reference(dtype, device):
    # Odd sizes: dim 37 leaves a partial channel block, dstate 13 a partial state block, seqlen 29
    # (333 on a GPU) a partial time block (8 steps on the interpreter, 512 on a GPU).
    batch, dim, dstate, seqlen = sizes((2, 37, 13, 29), (2, 37 * 8, 13, 333))
    inputs = make_inputs(batch, dim, dstate, seqlen, 1, dtype, device)
    kernel, expected = run_both(inputs)
    assert kernel["out"].dtype == dtype
    assert kernel["last_state"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name in NAMES:
        assert kernel[f"d{name}"].dtype == inputs[name].dtype, name
    # bf16 gradients of the shared B/C sum many bf16-rounded terms: allow twice the bf16 tolerance.
    check_all(kernel, expected, dtype, scale=2.0 if dtype == torch.bfloat16 else 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_groups_and_no_optional_inputs(dtype, device):
    # ngroups 3 with dim 48: 16 channels per group, so a channel block never straddles two groups.
    batch, dim, dstate, seqlen = sizes((1, 48, 7, 21), (2, 48 * 6, 24, 300))
    inputs = make_inputs(
        batch,
        dim,
        dstate,
        seqlen,
        3,
        dtype,
        device,
        with_d=False,
        with_z=False,
        with_bias=False,
        with_initial=False,
    )
    kernel, expected = run_both(inputs, delta_softplus=False, with_last_grad=False)
    check_all(kernel, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_packed_sequences(dtype, device):
    # An empty sequence, one shorter than a time block, and sequences starting mid-block.
    lengths = sizes([7, 0, 23, 15], [70, 0, 230, 1, 150])
    dim, dstate = sizes((5, 13), (40, 13))
    seqlen = sum(lengths)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    inputs = make_inputs(1, dim, dstate, seqlen, 1, dtype, device, num_states=len(lengths))
    kernel, expected = run_both(inputs, cu_seqlens=cu_seqlens)
    check_all(kernel, expected, dtype)

    # The packed batch gives exactly what the sequences give one at a time.
    kernels = _triton()
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        if end == start:
            initial = inputs["initial_state"][i].to(kernel["last_state"].dtype)
            assert torch.equal(kernel["last_state"][i], initial), f"empty sequence {i} changed its state"
            continue
        piece = {
            n: (v[..., start:end] if v is not None and v.dim() >= 3 and n != "initial_state" else v)
            for n, v in inputs.items()
        }
        with torch.no_grad():
            out, last = kernels.selective_scan_triton(
                piece["u"],
                piece["delta"],
                piece["A"],
                piece["B"],
                piece["C"],
                piece["D"],
                piece["z"],
                piece["delta_bias"],
                True,
                True,
                inputs["initial_state"][i : i + 1],
                None,
            )
        assert_close(kernel["out"][..., start:end], out, dtype, name=f"out of sequence {i}")
        assert_close(kernel["last_state"][i : i + 1], last, dtype, name=f"last_state of sequence {i}")


@pytest.mark.skipif(not INTERPRETER, reason="the GPU always runs the associative-scan path")
@pytest.mark.parametrize("ngroups", [1, 2])
def test_associative_scan_path_on_interpreter(ngroups, device):
    # The interpreter normally replaces the in-block associative scans by a segment-decay form (see
    # scan_common); this runs the GPU's scans (forward and reverse) at a tiny size.
    from ssmkit.ops.selective_scan.triton.config import forced

    inputs = make_inputs(1, 4, 3, 21, ngroups, torch.float64, device)
    with forced("forward", product_form=False), forced("backward", product_form=False):
        kernel, expected = run_both(inputs)
    check_all(kernel, expected, torch.float64)


@pytest.mark.parametrize("block_l", [8, 16])
def test_one_channel_per_program_on_interpreter(block_l, device):
    # The Hopper tables run one channel per program (block_d = 1) with long time blocks; this runs
    # that tiling (the GPU's associative scans, several time blocks, a ragged last one) small.
    from ssmkit.ops.selective_scan.triton.config import forced

    inputs = make_inputs(2, 3, 3, 2 * block_l + 5, 1, torch.float64, device)
    tiling = dict(block_d=1, block_l=block_l, num_warps=1, product_form=False)
    with forced("forward", **tiling), forced("backward", **tiling):
        kernel, expected = run_both(inputs)
    check_all(kernel, expected, torch.float64)


def test_strided_inputs(device):
    dtype = torch.float32
    batch, dim, dstate, seqlen = sizes((2, 6, 5, 35), (2, 64, 16, 257))
    inputs = make_inputs(batch, dim, dstate, seqlen, 1, dtype, device)
    strided = dict(inputs)
    # Time-major storage (as from a (batch, seqlen, dim) projection) and B/C sliced from a wider
    # buffer: the kernels must read them without the caller making copies.
    strided["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["z"] = inputs["z"].transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(batch, 1, dstate * 2, seqlen + 3, device=device, dtype=dtype)
    wide[:, :, ::2, 1 : seqlen + 1] = inputs["B"]
    strided["B"] = wide[:, :, ::2, 1 : seqlen + 1]
    strided["delta"] = torch.cat([inputs["delta"], inputs["delta"]], dim=1)[:, :dim]
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    kernel, expected = run_both(strided)
    check_all(kernel, expected, dtype)


def test_no_grad_forward_matches_training_forward(device):
    kernels = _triton()
    batch, dim, dstate, seqlen = sizes((1, 9, 13, 40), (2, 256, 16, 1000))
    inputs = make_inputs(batch, dim, dstate, seqlen, 1, torch.float32, device)
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with torch.no_grad():
        out, last = kernels.selective_scan_triton(*args, True, True, inputs["initial_state"], None)
    u = inputs["u"].clone().requires_grad_(True)
    out_grad, last_grad = kernels.selective_scan_triton(
        u, *args[1:], True, True, inputs["initial_state"], None
    )
    # Different time blocks (the training forward uses the backward's) change only rounding.
    assert_close(out, out_grad.detach(), torch.float32, name="out")
    assert_close(last, last_grad.detach(), torch.float32, name="last_state")
    _, none_state = kernels.selective_scan_triton(*args, True, False, None, None)
    assert none_state is None


def _op_args(device):
    inputs = make_inputs(1, 3, 4, 18, 1, torch.float32, device)
    return [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]


def test_custom_op_registration(device):
    kernels = _triton()
    args = _op_args(device)
    for value in args:
        value.requires_grad_(True)
    op = torch.ops.ssmkit.selective_scan_fwd.default
    # schema, fake-tensor shapes and autograd registration (the aot_dispatch check would run the
    # interpreter a dozen more times; the torch.compile test below covers tracing).
    torch.library.opcheck(
        op,
        (*args, None, True, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    assert kernels.selective_scan_triton.__module__.startswith("ssmkit.ops.selective_scan.triton")


def test_compile_fullgraph_traces_without_graph_breaks(device):
    kernels = _triton()
    args = _op_args(device)
    u = args[0].clone().requires_grad_(True)

    def step(u_in):
        out, last = kernels.selective_scan_triton(u_in, *args[1:8], True, True, args[8], None)
        return out.sum() + last.sum()

    # aot_eager traces forward and backward through the fake implementations without Inductor,
    # so it runs on the CPU interpreter too; fullgraph=True fails on any graph break.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(u)
    loss.backward()
    u_eager = args[0].clone().requires_grad_(True)
    step(u_eager).backward()
    assert_close(u.grad, u_eager.grad, torch.float32, name="du through torch.compile")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor + CUDA graphs need a GPU")
def test_compile_inductor_and_cuda_graph_capture():
    kernels = _triton()
    device = device_for_tests()
    inputs = make_inputs(2, 64, 16, 300, 1, torch.bfloat16, device)
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with torch.no_grad():
        eager, _ = kernels.selective_scan_triton(*args, True, False, None, None)
        compiled = torch.compile(
            lambda *a: kernels.selective_scan_triton(*a, True, False, None, None)[0], fullgraph=True
        )
        assert_close(compiled(*args), eager, torch.bfloat16, name="compiled out")
        graph = torch.cuda.CUDAGraph()
        static_out = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            kernels.selective_scan_triton(*args, True, False, None, None)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            static_out, _ = kernels.selective_scan_triton(*args, True, False, None, None)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_out, eager, torch.bfloat16, name="graph-replayed out")
