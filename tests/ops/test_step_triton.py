"""Triton decode step (``ssmkit::selective_state_update``): what the shared parity tests do not cover.

Stride-0 per-head broadcasts, non-contiguous inputs, a state pool addressed by indices, every dtype,
the custom-op registration (opcheck), and, on a GPU, torch.compile and CUDA-graph capture.
Ground truth: the fp64 reference run on the same (rounded) input values.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import dispatch, selective_state_update
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(
    not dispatch.triton_importable() or (not torch.cuda.is_available() and not dispatch.triton_interpret()),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)

# (batch, pool, nheads, headdim, dstate, ngroups)
SHAPES = [
    (2, 2, 3, 24, 13, 1),
    (3, 5, 6, 16, 16, 3),
    (1, 4, 4, 37, 8, 2),
]


def _triton_step():
    from ssmkit.ops.step.triton import selective_state_update_triton

    return selective_state_update_triton


def _inputs(batch, pool, nheads, headdim, dstate, ngroups, dtype, state_dtype, per_head, device):
    """Canonical-layout inputs; per_head gives dt, A, D, dt_bias as stride-0 expanded views."""
    g = lambda *shape: torch.randn(*shape, device=device, dtype=torch.float64)
    if per_head:
        dt = g(batch, nheads, 1).expand(batch, nheads, headdim)
        A = -torch.rand(nheads, 1, 1, device=device, dtype=torch.float64).expand(nheads, headdim, dstate)
        D = g(nheads, 1).expand(nheads, headdim)
        dt_bias = g(nheads, 1).expand(nheads, headdim)
    else:
        dt = g(batch, nheads, headdim)
        A = -torch.rand(nheads, headdim, dstate, device=device, dtype=torch.float64)
        D = g(nheads, headdim)
        dt_bias = g(nheads, headdim)
    tensors = dict(
        x=g(batch, nheads, headdim),
        dt=dt,
        A=A,
        B=g(batch, ngroups, dstate),
        C=g(batch, ngroups, dstate),
        D=D,
        z=g(batch, nheads, headdim),
        dt_bias=dt_bias,
    )
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    state = g(pool, nheads, headdim, dstate).to(state_dtype)
    return state, tensors


def _expected(state, tensors, dt_softplus, indices):
    """fp64 reference on copies: (y, state after the step)."""
    state64 = state.double().clone()
    inputs64 = {name: None if t is None else t.double() for name, t in tensors.items()}
    y = selective_state_update(
        state64, **inputs64, dt_softplus=dt_softplus, state_batch_indices=indices, backend="reference"
    )
    return y, state64


def _run(state, tensors, dt_softplus, indices):
    t = tensors
    return _triton_step()(
        state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], dt_softplus, indices
    )


@pytest.mark.parametrize(
    "dtype, state_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize("per_head", [False, True], ids=["full", "per_head"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, state_dtype, per_head, shape, device):
    batch, pool, nheads, headdim, dstate, ngroups = shape
    state, tensors = _inputs(*shape, dtype, state_dtype, per_head, device)
    # Rows of the pool in a scrambled order; the other rows must stay untouched.
    indices = torch.randperm(pool, device=device)[:batch].to(torch.int32) if pool > batch else None
    expected_y, expected_state = _expected(state, tensors, True, indices)
    before = state.clone()
    y = _run(state, tensors, True, indices)
    assert y.dtype == dtype and state.dtype == state_dtype
    assert_close(y, expected_y, dtype, name="y")
    # The state is rounded once to its dtype, so compare with that dtype's tolerance.
    assert_close(state, expected_state, state_dtype if state_dtype != torch.float32 else dtype, name="state")
    if indices is not None:
        untouched = torch.ones(pool, dtype=torch.bool, device=device)
        untouched[indices.long()] = False
        assert torch.equal(state[untouched], before[untouched])


@pytest.mark.parametrize(
    "with_D, with_z, with_bias, softplus",
    [
        (False, False, False, False),
        (True, False, True, False),
        (False, True, False, True),
    ],
)
def test_optional_arguments(with_D, with_z, with_bias, softplus, device):
    state, tensors = _inputs(2, 2, 3, 24, 13, 1, torch.float32, torch.float32, False, device)
    tensors["D"] = tensors["D"] if with_D else None
    tensors["z"] = tensors["z"] if with_z else None
    tensors["dt_bias"] = tensors["dt_bias"] if with_bias else None
    expected_y, expected_state = _expected(state, tensors, softplus, None)
    y = _run(state, tensors, softplus, None)
    assert_close(y, expected_y, torch.float32, name="y")
    assert_close(state, expected_state, torch.float32, name="state")


def test_dt_per_head_with_full_bias(device):
    """dt broadcast per head but dt_bias varying along headdim: dt + dt_bias is not per head."""
    state, tensors = _inputs(2, 2, 3, 24, 13, 1, torch.float32, torch.float32, True, device)
    tensors["dt_bias"] = torch.randn(3, 24, device=device)
    expected_y, expected_state = _expected(state, tensors, True, None)
    y = _run(state, tensors, True, None)
    assert_close(y, expected_y, torch.float32, name="y")
    assert_close(state, expected_state, torch.float32, name="state")


def test_non_contiguous(device):
    """Transposed and sliced views everywhere, the state included (updated through its view)."""
    batch, nheads, headdim, dstate, ngroups = 2, 4, 24, 13, 2
    big_state = torch.randn(batch, headdim, nheads, dstate + 3, device=device)
    state = big_state.transpose(1, 2)[..., :dstate]  # (batch, nheads, headdim, dstate), strided
    t = lambda *shape: torch.randn(*shape, device=device)
    tensors = dict(
        x=t(batch, headdim, nheads).transpose(1, 2),
        dt=t(batch, nheads, 2 * headdim)[..., ::2],
        A=-torch.rand(headdim, nheads, dstate, device=device).transpose(0, 1),
        B=t(batch, dstate, ngroups).transpose(1, 2),
        C=t(ngroups, batch, dstate).transpose(0, 1),
        D=t(headdim, nheads).t(),
        z=t(nheads, batch, headdim).transpose(0, 1),
        dt_bias=t(headdim, nheads).t(),
    )
    assert not state.is_contiguous() and not tensors["x"].is_contiguous()
    expected_y, expected_state = _expected(state, tensors, True, None)
    padding = big_state[..., dstate:].clone()
    y = _run(state, tensors, True, None)
    assert_close(y, expected_y, torch.float32, name="y")
    assert_close(state, expected_state, torch.float32, name="state")
    assert torch.equal(big_state[..., dstate:], padding), "wrote outside the state view"


def test_public_function_mamba1_layout(device):
    """The public function in the Mamba-1 layout (headdim 1 after canonicalisation) on the Triton path."""
    batch, dim, dstate = 3, 10, 7
    state = torch.randn(batch, dim, dstate, device=device)
    args = [
        torch.randn(batch, dim, device=device),
        torch.randn(batch, dim, device=device),
        -torch.rand(dim, dstate, device=device),
        torch.randn(batch, dstate, device=device),
        torch.randn(batch, dstate, device=device),
    ]
    kwargs = dict(
        D=torch.randn(dim, device=device),
        z=torch.randn(batch, dim, device=device),
        dt_bias=torch.randn(dim, device=device),
        dt_softplus=True,
    )
    state_ref = state.double().clone()
    expected = selective_state_update(
        state_ref,
        *[a.double() for a in args],
        **{k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()},
        backend="reference",
    )
    y = selective_state_update(state, *args, **kwargs, backend="triton")
    assert_close(y, expected, torch.float32, name="y")
    assert_close(state, state_ref, torch.float32, name="state")


def test_opcheck(device):
    state, t = _inputs(2, 3, 3, 16, 8, 1, torch.float32, torch.float32, True, device)
    indices = torch.tensor([2, 0], dtype=torch.int32, device=device)
    _triton_step()  # registers the op
    args = (state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, indices)
    torch.library.opcheck(torch.ops.ssmkit.selective_state_update.default, args)


# On a GPU the compiled graph goes through inductor; on the CPU (Triton interpreter) through
# aot_eager, which still traces the custom op, its fake function and its autograd formula.
def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True) keeps the op in one graph and its in-place state update visible."""
    state, t = _inputs(4, 4, 6, 32, 16, 2, torch.bfloat16, torch.float32, True, device)
    entry = _triton_step()
    step = torch.compile(
        lambda state, x, dt, A, B, C, D, z, dt_bias: entry(state, x, dt, A, B, C, D, z, dt_bias, True, None),
        fullgraph=True,
        backend="inductor" if device.type == "cuda" else "aot_eager",
    )
    expected_y, expected_state = _expected(state, t, True, None)
    y = step(state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"])
    assert_close(y, expected_y, torch.bfloat16, name="y")
    assert_close(state, expected_state, torch.bfloat16, name="state")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture(device):
    """Three captured steps replayed: the kernel must not synchronise and must update in place."""
    state, t = _inputs(4, 6, 6, 32, 16, 2, torch.float32, torch.float32, True, device)
    indices = torch.tensor([5, 0, 3, 1], dtype=torch.int32, device=device)
    expected_state = state.double().clone()
    for _ in range(3):
        expected_y = selective_state_update(
            expected_state,
            **{k: v.double() for k, v in t.items()},
            dt_softplus=True,
            state_batch_indices=indices,
            backend="reference",
        )
    work = state.clone()
    _run(work, t, True, indices)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _run(state, t, True, indices)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert_close(y, expected_y, torch.float32, name="y")
    assert_close(state, expected_state, torch.float32, name="state")


@pytest.mark.parametrize("per_head", [False, True], ids=["full", "per_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_A_is_log(per_head, dtype, device):
    """The kernel computes A = -exp(A_log) itself, per head (stride 0) or per element."""
    state, tensors = _inputs(3, 5, 6, 16, 16, 3, dtype, torch.float32, per_head, device)
    indices = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    expected_y, expected_state = _expected(state, tensors, True, indices)
    A_log = torch.log(-tensors["A"].double()).to(dtype)
    if per_head:
        A_log = A_log[:, :1, :1].expand(tensors["A"].shape)  # stride-0 again after the log
    t = {**tensors, "A": A_log}
    y = _triton_step()(
        state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, indices, True
    )
    # A was rounded to dtype before the log; log and exp round again in bf16 inputs: compare in dtype.
    assert_close(y, expected_y, dtype, scale=2.0, name="y")
    assert_close(state, expected_state, dtype, scale=2.0, name="state")


def test_opcheck_A_is_log(device):
    state, t = _inputs(2, 3, 3, 16, 8, 1, torch.float32, torch.float32, True, device)
    _triton_step()  # registers the op
    args = (state, t["x"], t["dt"], t["A"].abs().log(), t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True)
    torch.library.opcheck(torch.ops.ssmkit.selective_state_update.default, (*args, None, True))
