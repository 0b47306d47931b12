"""Stable state scan (full transition, LayerNormed state): the fused Triton kernels against the
step-by-step PyTorch loop, forward values, final state and the gradient of every input, with and
without an initial state and sequence resets, at odd sizes and lengths that are not a multiple of
the checkpoint interval; the layer through both paths; dispatch and argument checks.

Ground truth is autograd through the reference loop in fp64, fed the same (rounded) values as the
path under test. Without a GPU the kernels run on Triton's CPU interpreter, hence the tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.layers.grounded import StableStateSSM, stable_state_scan
from ssmkit.ops import backend as use_backend
from ssmkit.ops.stable_scan import stable_scan
from ssmkit.ops.stable_scan.reference import stable_scan_reference
from tests.helpers import assert_close, backend_params

TRITON = [p for p in backend_params("ssmkit.ops.stable_scan") if p.values[0] == "triton"]
NAMES = ("x", "dt", "A", "B", "C", "norm_weight", "norm_bias", "initial_state")
EPS = 1e-5


def make_inputs(
    batch: int, seqlen: int, d_inner: int, d_state: int, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Inputs as StableStateSSM feeds them: dt in the layer's range (up to 0.1), a transition of
    the size its spectral normalisation allows, LayerNorm parameters near (1, 0), a LayerNormed
    initial state (entries of order 1)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64)

    tensors = {
        "x": randn(batch, seqlen, d_inner),
        "dt": 0.001 + 0.099 * torch.rand(batch, seqlen, d_inner, dtype=torch.float64),
        "A": -3.0 * torch.eye(d_state, dtype=torch.float64) + randn(d_state, d_state),
        "B": randn(batch, seqlen, d_state),
        "C": randn(batch, seqlen, d_state),
        "norm_weight": 1.0 + 0.2 * randn(d_state),
        "norm_bias": 0.2 * randn(d_state),
        "initial_state": randn(batch, d_inner, d_state),
    }
    return {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}


def seq_idx_for(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """Row 0 restarts at 1 (a segment of one step), 5 and 8 (a multiple of the test chunk 4);
    row 1 never restarts."""
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for t in (1, 5, 8):
        seq_idx[0, t:] += 1
    return seq_idx.to(device)


def run(scan_backend: str, inputs, *, with_initial: bool, seq_idx, fp64: bool = False, **kwargs):
    """Forward and the gradients of every input for one random cotangent of y and of the state."""
    leaves = {
        name: (t.detach().double() if fp64 else t.detach().clone()).requires_grad_()
        for name, t in inputs.items()
        if name != "initial_state" or with_initial
    }
    y, final = stable_scan(
        *(leaves[name] for name in NAMES[:7]), eps=EPS, initial_state=leaves.get("initial_state"),
        seq_idx=seq_idx, backend=scan_backend, **kwargs,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y)
    dfinal = torch.randn(final.shape, generator=generator, dtype=torch.float64).to(final)
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


def check_against_reference(inputs, dtype, *, with_initial, seq_idx, grad_scale=10.0, **kwargs):
    y, final, grads = run("triton", inputs, with_initial=with_initial, seq_idx=seq_idx, **kwargs)
    y_ref, final_ref, grads_ref = run(
        "reference", inputs, with_initial=with_initial, seq_idx=seq_idx, fp64=True
    )
    assert y.dtype == dtype and final.dtype == dtype
    assert_close(y, y_ref, dtype, name="y")
    assert_close(final, final_ref, dtype, name="final state")
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        assert_close(grad, grads_ref[name], dtype, scale=grad_scale, name=f"d{name}")


@pytest.mark.parametrize("scan_backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("with_seq_idx", [False, True], ids=["one_sequence", "seq_idx"])
def test_triton_matches_reference(scan_backend, dtype, with_initial, with_seq_idx, device):
    # seqlen 13 with checkpoints every 4 steps: three full segments and one of a single step.
    batch, seqlen, d_inner, d_state = 2, 13, 5, 7
    inputs = make_inputs(batch, seqlen, d_inner, d_state, dtype, device)
    seq_idx = seq_idx_for(batch, seqlen, device) if with_seq_idx else None
    check_against_reference(inputs, dtype, with_initial=with_initial, seq_idx=seq_idx, chunk=4)


@pytest.mark.parametrize("scan_backend", TRITON)
@pytest.mark.parametrize(
    "seqlen, d_inner, d_state, chunk",
    [(37, 24, 16, 32), (29, 9, 11, 6), (1, 3, 5, 4)],
    ids=["default_chunk", "odd", "one_step"],
)
def test_triton_matches_reference_at_other_sizes(scan_backend, seqlen, d_inner, d_state, chunk, device):
    inputs = make_inputs(2, seqlen, d_inner, d_state, torch.float32, device)
    seq_idx = seq_idx_for(2, seqlen, device) if seqlen > 8 else None
    check_against_reference(inputs, torch.float32, with_initial=True, seq_idx=seq_idx, chunk=chunk)


@pytest.mark.parametrize("scan_backend", TRITON)
def test_several_channel_blocks_sum_their_partial_gradients(scan_backend, device, monkeypatch):
    """Channel blocks of 16 (the GPU's) over 37 channels: three programs per row, the last one
    mostly padding; dA, dB, dC and the norm gradients are sums of their per-block partials."""
    import ssmkit.ops.stable_scan.triton as stable_triton

    monkeypatch.setattr(stable_triton, "_launch_config", lambda d_inner, device: (16, 1))
    inputs = make_inputs(2, 11, 37, 9, torch.float64, device)
    check_against_reference(
        inputs, torch.float64, with_initial=True, seq_idx=seq_idx_for(2, 11, device), chunk=4
    )


@pytest.mark.parametrize("scan_backend", TRITON)
def test_forward_without_gradients_keeps_no_checkpoints(scan_backend, device):
    import ssmkit.ops.stable_scan.triton as stable_triton

    inputs = make_inputs(2, 10, 6, 5, torch.float32, device)
    args = [inputs[name] for name in NAMES[:7]]
    y, final, checkpoints = stable_triton._scan_forward(*args, EPS, inputs["initial_state"], None, 4, False)
    assert checkpoints.numel() == 0
    with torch.no_grad():
        y_ref, final_ref = stable_scan_reference(*args, eps=EPS, initial_state=inputs["initial_state"])
    assert_close(y, y_ref, torch.float32, name="y")
    assert_close(final, final_ref, torch.float32, name="final state")
    _, _, checkpoints = stable_triton._scan_forward(*args, EPS, inputs["initial_state"], None, 4, True)
    assert checkpoints.shape == (2, 3, 6, 5)  # the states before steps 0, 4 and 8
    assert torch.equal(checkpoints[:, 0], inputs["initial_state"])


@pytest.mark.parametrize("scan_backend", TRITON)
def test_custom_op_schema_and_fake_implementation(scan_backend, device):
    import ssmkit.ops.stable_scan.triton as stable_triton

    inputs = make_inputs(2, 6, 5, 4, torch.float32, device)
    args = (*(inputs[name] for name in NAMES[:7]), EPS, inputs["initial_state"], None, 4, True)
    torch.library.opcheck(
        stable_triton._stable_scan_fwd_op, args, test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("scan_backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_layer_gives_the_same_output_through_both_paths(scan_backend, dtype, device):
    """StableStateSSM with the scan forced to Triton and to the PyTorch loop: same output, final
    state and parameter gradients, with an initial state and packed sequences."""
    torch.manual_seed(0)
    layer = StableStateSSM(12, d_state=13).to(device=device, dtype=dtype)
    hidden = torch.randn(2, 19, 12, device=device, dtype=dtype)
    initial = torch.randn(2, layer.d_inner, 13, device=device, dtype=dtype)
    seq_idx = seq_idx_for(2, 19, device)
    results = {}
    for name in ("torch", "triton"):
        layer.zero_grad()
        with use_backend(name):
            out, final = layer(hidden, initial_state=initial, seq_idx=seq_idx)
        (out.square().sum() + final.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results[name] = (out, final, grads)
    out, final, grads = results["triton"]
    out_ref, final_ref, grads_ref = results["torch"]
    assert_close(out, out_ref, dtype, name="out")
    assert_close(final, final_ref, dtype, name="final state")
    # Two fp32 evaluations (neither is the truth): a weight gradient sums batch x seqlen terms that
    # cancel, in another order in each path; on an H100 dt_proj.weight differed by 1.8e-4. The
    # fp64 case holds both paths to fp64 rounding.
    scale = 30.0 if dtype == torch.float32 else 10.0
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], dtype, scale=scale, name=f"grad {name}")


@pytest.mark.parametrize("scan_backend", TRITON)
def test_zoh_runs_the_pytorch_loop_under_any_backend(scan_backend, device):
    inputs = make_inputs(1, 5, 3, 4, torch.float64, device)
    args = [inputs[name] for name in NAMES[:7]]
    with use_backend("triton"):
        y, final = stable_state_scan(*args, eps=EPS, discretization="zoh")
    y_ref, final_ref = stable_scan_reference(*args, eps=EPS, discretization="zoh")
    assert torch.equal(y, y_ref) and torch.equal(final, final_ref)


def test_auto_backend_on_cpu_is_the_reference_loop():
    inputs = make_inputs(2, 7, 3, 4, torch.float64, torch.device("cpu"))
    args = [inputs[name] for name in NAMES[:7]]
    y, final = stable_scan(*args, eps=EPS, backend="auto")
    y_ref, final_ref = stable_scan_reference(*args, eps=EPS)
    assert torch.equal(y, y_ref) and torch.equal(final, final_ref)


def test_bad_arguments_are_named():
    inputs = make_inputs(2, 7, 3, 4, torch.float32, torch.device("cpu"))
    args = [inputs[name] for name in NAMES[:7]]
    with pytest.raises(ValueError, match="discretization must be one of"):
        stable_scan(*args, eps=EPS, discretization="bilinear")
    with pytest.raises(ValueError, match="B must have shape"):
        stable_scan(*args[:3], args[3][:, :-1], *args[4:], eps=EPS)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        stable_scan(*args, eps=EPS, initial_state=inputs["initial_state"][:1])
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        stable_scan(*args, eps=EPS, seq_idx=torch.zeros(2, 6, dtype=torch.int32))


@pytest.mark.parametrize("scan_backend", TRITON)
def test_torch_compile_traces_the_custom_ops(scan_backend, device):
    """Under torch.compile the scan runs as the registered custom ops (fake implementations for
    tracing, the registered autograd formula for the backward), without a graph break; the loss
    uses y only, so the backward gets no cotangent for the final state."""
    inputs = make_inputs(2, 9, 5, 6, torch.float32, device)
    seq_idx = seq_idx_for(2, 9, device)

    def loss(*tensors: torch.Tensor) -> torch.Tensor:
        y, _ = stable_scan(
            *tensors[:7], eps=EPS, initial_state=tensors[7], seq_idx=seq_idx, backend="triton", chunk=4
        )
        return (y * y).sum()

    leaves = [inputs[name].clone().requires_grad_() for name in NAMES]
    grads = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    reference = [inputs[name].double().requires_grad_() for name in NAMES]
    y_ref, _ = stable_scan_reference(*reference[:7], eps=EPS, initial_state=reference[7], seq_idx=seq_idx)
    grads_ref = torch.autograd.grad((y_ref * y_ref).sum(), reference)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref):
        assert_close(grad, grad_ref, torch.float32, scale=10.0, name=f"d{name}")
