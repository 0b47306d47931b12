"""Mamba-1 selective scan: fast paths vs the fp64 reference (forward and gradients), state
chaining, packed sequences, robustness to large decays, the chunked path's internals, bad input.

Ground truth is autograd through the sequential reference in fp64, fed the same (rounded) values
as the path under test. Shapes are tiny when Triton runs on the CPU interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops import backend as use_backend
from ssmkit.ops import selective_scan_fn
from ssmkit.ops.selective_scan import chunked
from ssmkit.ops.selective_scan.reference import selective_scan_reference
from tests.helpers import assert_close, backend_params, on_interpreter

BACKENDS = backend_params("ssmkit.ops.selective_scan")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(
    batch: int,
    dim: int,
    dstate: int,
    seqlen: int,
    ngroups: int | None,
    dtype: torch.dtype,
    device: torch.device,
    *,
    with_d: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    softplus: bool = True,
    num_states: int | None = None,
    delta_scale: float = 1.0,
    A_scale: float = 1.0,
) -> dict[str, torch.Tensor | None]:
    """Inputs as Mamba holds them: activations (u, delta, z, B, C) in ``dtype``; A, D, delta_bias
    and the initial state in fp32 (fp64 when ``dtype`` is fp64). ngroups None: 3-D B and C.

    A[:, n] = -(n + 1) * U[0.5, 1.5) * A_scale: Mamba's S4D-real init, jittered. With softplus,
    delta and delta_bias are pre-activations as in Mamba (steps softplus(delta + delta_bias) in
    [0.05, 0.31], or softplus(delta) in [0.69, 1.31] without a bias); without softplus,
    delta + delta_bias is a positive step in [0, delta_scale + 0.1).
    """
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dt)

    groups_shape = (batch, dstate, seqlen) if ngroups is None else (batch, ngroups, dstate, seqlen)
    spread = 0.5 + torch.rand(dim, dstate, dtype=torch.float64)
    A = -torch.arange(1, dstate + 1, dtype=torch.float64) * spread
    delta = torch.rand(batch, dim, seqlen, dtype=torch.float64) * delta_scale
    bias = torch.rand(dim, dtype=torch.float64)
    if softplus and with_bias:
        delta, bias = delta - 1.0, bias - 2.0
    elif not softplus:
        bias = bias * 0.1
    return {
        "u": randn(batch, dim, seqlen),
        "delta": delta.to(device=device, dtype=dtype),
        "A": (A * A_scale).to(device=device, dtype=param_dtype),
        "B": randn(*groups_shape),
        "C": randn(*groups_shape),
        "D": randn(dim, dt=param_dtype) if with_d else None,
        "z": randn(batch, dim, seqlen) if with_z else None,
        "delta_bias": bias.to(device=device, dtype=param_dtype) if with_bias else None,
        "initial_state": randn(num_states or batch, dim, dstate, dt=param_dtype),
    }


def leaves(inputs: dict[str, torch.Tensor | None], fp64: bool = False) -> dict[str, torch.Tensor | None]:
    """Fresh leaf copies requiring grad (fp64 copies of the same values for the ground truth)."""
    return {
        name: None if t is None else (t.detach().double() if fp64 else t.detach().clone()).requires_grad_()
        for name, t in inputs.items()
    }


def run(inputs: dict[str, torch.Tensor | None], backend: str, *, softplus: bool, cu_seqlens=None):
    return selective_scan_fn(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        inputs["D"],
        inputs["z"],
        inputs["delta_bias"],
        softplus,
        True,
        initial_state=inputs["initial_state"],
        cu_seqlens=cu_seqlens,
        backend=backend,
    )


def check_against_reference(inputs, backend, dtype, *, softplus: bool, cu_seqlens=None, grad_scale=2.0):
    """Forward (out, last_state) and the gradients of every input vs autograd through the fp64
    reference, with the same cotangents (rounded to the tested dtype) on both sides."""
    tested, truth = leaves(inputs), leaves(inputs, fp64=True)
    out, last = run(tested, backend, softplus=softplus, cu_seqlens=cu_seqlens)
    expected, expected_last = run(truth, "reference", softplus=softplus, cu_seqlens=cu_seqlens)
    assert out.dtype == dtype and out.shape == expected.shape
    # The state stays in the compute dtype: fp32 for half inputs, like mamba_ssm.
    assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, expected, dtype, name="out")
    assert_close(last, expected_last, dtype, name="last_state")

    grad_out = torch.randn_like(expected).to(dtype)
    grad_last = torch.randn_like(expected_last).to(last.dtype)
    names = [n for n in NAMES if tested[n] is not None]
    grads = torch.autograd.grad((out, last), [tested[n] for n in names], (grad_out, grad_last))
    expected_grads = torch.autograd.grad(
        (expected, expected_last), [truth[n] for n in names], (grad_out.double(), grad_last.double())
    )
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert grad.dtype == tested[name].dtype, name
        assert_close(grad, expected_grad, dtype, scale=grad_scale, name=f"grad {name}")


# (batch, dim, dstate, seqlen, ngroups or None for 3-D B/C, with D, z, delta_bias, softplus)
CASES = [
    (2, 37, 13, 75, None, True, True, True, True),
    (2, 6, 5, 75, 3, True, False, True, True),
    (1, 8, 4, 33, 2, False, True, False, False),
    (3, 4, 3, 130, 1, False, False, False, True),
]
# The Triton interpreter runs every program instance in Python: same features, smaller sizes.
INTERPRETER_CASES = [
    (2, 6, 5, 11, None, True, True, True, True),
    (1, 4, 3, 9, 2, False, True, False, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(backend, dtype, case, device):
    cases = INTERPRETER_CASES if on_interpreter(backend) else CASES
    if case >= len(cases):
        pytest.skip("the Triton interpreter runs the smaller case list")
    batch, dim, dstate, seqlen, ngroups, with_d, with_z, with_bias, softplus = cases[case]
    inputs = make_inputs(
        batch,
        dim,
        dstate,
        seqlen,
        ngroups,
        dtype,
        device,
        with_d=with_d,
        with_z=with_z,
        with_bias=with_bias,
        softplus=softplus,
    )
    check_against_reference(inputs, backend, dtype, softplus=softplus)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "with_d, with_z, with_bias, softplus",
    [
        (False, False, False, False),
        (True, False, False, False),
        (False, True, False, False),
        (False, False, True, False),
        (False, False, False, True),
        (True, True, True, True),
    ],
)
def test_optional_inputs(backend, with_d, with_z, with_bias, softplus, device):
    size = (1, 4, 3, 9) if on_interpreter(backend) else (2, 11, 7, 40)
    inputs = make_inputs(
        *size, 1, torch.float64, device, with_d=with_d, with_z=with_z, with_bias=with_bias, softplus=softplus
    )
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = selective_scan_fn(*args, softplus, backend=backend)
    expected = selective_scan_fn(*args, softplus, backend="reference")
    assert isinstance(out, torch.Tensor)  # no state asked for: a tensor, as in mamba_ssm
    assert_close(out, expected, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_split_sequence_continues_from_last_state(backend, dtype, device):
    """Scanning [0, s) then [s, L) from the returned state gives the one-pass result."""
    batch, dim, dstate, seqlen, split = (1, 4, 3, 10, 4) if on_interpreter(backend) else (2, 9, 5, 75, 33)
    inputs = make_inputs(batch, dim, dstate, seqlen, 2 if dim % 2 == 0 else None, dtype, device)
    full, full_last = run(inputs, backend, softplus=True)

    def part(lo: int, hi: int, state: torch.Tensor) -> dict[str, torch.Tensor | None]:
        piece = dict(inputs, initial_state=state)
        for name in ("u", "delta", "z", "B", "C"):
            piece[name] = inputs[name][..., lo:hi]
        return piece

    first, middle = run(part(0, split, inputs["initial_state"]), backend, softplus=True)
    second, last = run(part(split, seqlen, middle), backend, softplus=True)
    assert_close(torch.cat([first, second], dim=-1), full, dtype, name="out")
    assert_close(last, full_last, dtype, name="last_state")


PACKINGS = [
    [0, 7, 7, 20, 21, 75],  # an empty sequence, a length-1 sequence, ends off the chunk grid
    [0, 0, 40, 40],  # empty first and last sequences
    [0, 32, 64, 75],  # boundaries on the default chunk grid
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bounds", PACKINGS, ids=str)
@pytest.mark.parametrize("with_initial", [True, False])
def test_packed_equals_one_by_one(backend, bounds, with_initial, device):
    if on_interpreter(backend):
        bounds = [b * 12 // bounds[-1] for b in bounds]  # same structure, 12 positions
    dim, dstate, seqlen, num_seqs = 6, 4, bounds[-1], len(bounds) - 1
    inputs = make_inputs(1, dim, dstate, seqlen, 2, torch.float64, device, num_states=num_seqs)
    if not with_initial:
        inputs["initial_state"] = None
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    out, last = run(inputs, backend, softplus=True, cu_seqlens=cu_seqlens)
    assert last.shape == (num_seqs, dim, dstate)
    for i in range(num_seqs):
        lo, hi = bounds[i], bounds[i + 1]
        alone = {name: t for name, t in inputs.items()}
        for name in ("u", "delta", "z", "B", "C"):
            alone[name] = inputs[name][..., lo:hi]
        if with_initial:
            alone["initial_state"] = inputs["initial_state"][i : i + 1]
        if hi > lo:
            expected, expected_last = run(alone, backend, softplus=True)
            assert_close(out[..., lo:hi], expected, torch.float64, name=f"out of sequence {i}")
        else:  # an empty sequence keeps its initial state (or zero)
            expected_last = alone["initial_state"] if with_initial else torch.zeros(1, dim, dstate)
        assert_close(last[i : i + 1], expected_last.to(last), torch.float64, name=f"last_state {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_packed_gradients(backend, dtype, device):
    bounds = [0, 3, 3, 9, 12] if on_interpreter(backend) else [0, 20, 20, 53, 54, 75]
    num_seqs = len(bounds) - 1
    inputs = make_inputs(1, 6, 4, bounds[-1], 3, dtype, device, num_states=num_seqs)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int64, device=device)
    check_against_reference(inputs, backend, dtype, softplus=True, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("delta_scale, A_scale", [(5.0, 1.0), (5.0, 8.0), (60.0, 4.0)])
def test_large_decays_stay_finite_and_exact(backend, dtype, delta_scale, A_scale, device):
    """Log-decays delta * A reaching -120, -960 and -5760 in one step (at dstate 16; exp
    underflows in both precisions): a method dividing cumulative decays, exp(S_t) / exp(S_s),
    overflows here."""
    size = (1, 4, 8, 12) if on_interpreter(backend) else (2, 9, 16, 100)
    inputs = make_inputs(
        *size, None, dtype, device, with_bias=False, softplus=False, delta_scale=delta_scale, A_scale=A_scale
    )
    # The Triton backward recovers exp(delta A) h_{t-1} as h_t - delta B u, which loses digits when
    # the decay is small (scan_bwd.py): on an H100, fp32 dA came within 2.3e-5 here (limit 2e-5).
    grad_scale = 4.0 if backend == "triton" else 2.0
    check_against_reference(inputs, backend, dtype, softplus=False, grad_scale=grad_scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_decay_steps_and_negative_delta(backend, device):
    """delta == 0 keeps the state (decay 1, no input); delta < 0 without softplus grows it: both
    are legal and must match the reference."""
    size = (1, 4, 3, 10) if on_interpreter(backend) else (2, 5, 4, 70)
    inputs = make_inputs(*size, None, torch.float64, device, with_bias=False, softplus=False, delta_scale=0.3)
    inputs["delta"][..., 3:7] = 0.0
    inputs["delta"][0, 0] = -0.05
    check_against_reference(inputs, backend, torch.float64, softplus=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, device):
    """Non-contiguous views (time-major storage, every other channel) give the contiguous result."""
    batch, dim, dstate, seqlen = (1, 4, 3, 9) if on_interpreter(backend) else (2, 7, 5, 40)
    inputs = make_inputs(batch, dim, dstate, seqlen, None, torch.float64, device)
    strided = dict(inputs)
    for name in ("u", "delta", "z"):
        wide = torch.zeros(seqlen, batch, 2 * dim, dtype=torch.float64, device=device)
        wide[:, :, ::2] = inputs[name].permute(2, 0, 1)
        strided[name] = wide[:, :, ::2].permute(1, 2, 0)
    for name in ("B", "C"):
        strided[name] = inputs[name].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    out, last = run(strided, backend, softplus=True)
    expected, expected_last = run(inputs, "reference", softplus=True)
    assert_close(out, expected, torch.float64, name="out")
    assert_close(last, expected_last, torch.float64, name="last_state")


# The chunked path's own structure: chunk sizes (tree depth, padding), channel blocks, groups.


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16, 32, 200])
def test_chunked_any_chunk_size(chunk_size, device):
    inputs = make_inputs(2, 6, 4, 151, 3, torch.float64, device)
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    expected = selective_scan_reference(*args, True, True, inputs["initial_state"])
    got = chunked.selective_scan_chunked(*args, True, True, inputs["initial_state"], chunk_size=chunk_size)
    assert_close(got[0], expected[0], torch.float64, name="out")
    assert_close(got[1], expected[1], torch.float64, name="last_state")


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_channel_blocks(grad, packed, monkeypatch, device):
    """Blocks of a few channels and batch rows (uneven last block; buffers reused between blocks
    without autograd) give the reference's result and, under autograd, its gradients."""
    batch, num_seqs = (1, 3) if packed else (3, 3)
    inputs = make_inputs(batch, 10, 4, 45, 2, torch.float64, device, num_states=num_seqs)
    cu_seqlens = torch.tensor([0, 12, 30, 45], device=device) if packed else None
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    truth = leaves(inputs, fp64=True)
    expected = selective_scan_reference(
        *[truth[n] for n in names[:-1]], True, True, truth["initial_state"], cu_seqlens
    )
    # 3 channels x 4 states x 45 positions per block: channel blocks of 3, 2 | 3, 2 in each group.
    monkeypatch.setattr(chunked, "_BLOCK_ELEMENTS", 3 * 4 * 45)
    monkeypatch.setattr(chunked, "_FORWARD_ONLY_BLOCK_FACTOR", 1)
    tested = leaves(inputs)
    with torch.set_grad_enabled(grad):
        got = chunked.selective_scan_chunked(
            *[tested[n] for n in names[:-1]], True, True, tested["initial_state"], cu_seqlens, chunk_size=8
        )
    assert_close(got[0], expected[0], torch.float64, name="out")
    assert_close(got[1], expected[1], torch.float64, name="last_state")
    if grad:
        cotangents = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
        grads = torch.autograd.grad(got, [tested[n] for n in names], cotangents)
        expected_grads = torch.autograd.grad(expected, [truth[n] for n in names], cotangents)
        for name, grad_value, expected_grad in zip(names, grads, expected_grads):
            assert_close(grad_value, expected_grad, torch.float64, name=f"grad {name}")


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 32, 200])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_gradients_any_chunk_size(chunk_size, packed, device):
    """The hand-written backward at every tree shape: one chunk (200), chunks that do not divide
    the length, and many chunks (1, 3: the level above recurses), against autograd through the
    fp64 reference, with odd sizes, restarts and initial and last states."""
    seqlen = 151
    bounds = [0, 1, 40, 40, 100, 151] if packed else None
    batch, num_seqs = (1, len(bounds) - 1) if packed else (2, None)
    inputs = make_inputs(batch, 37, 13, seqlen, 1, torch.float64, device, num_states=num_seqs)
    cu_seqlens = torch.tensor(bounds, device=device) if packed else None
    truth, tested = leaves(inputs, fp64=True), leaves(inputs)
    expected = selective_scan_reference(
        *[truth[n] for n in NAMES[:-1]], True, True, truth["initial_state"], cu_seqlens
    )
    got = chunked.selective_scan_chunked(
        *[tested[n] for n in NAMES[:-1]],
        True,
        True,
        tested["initial_state"],
        cu_seqlens,
        chunk_size=chunk_size,
    )
    assert_close(got[0], expected[0], torch.float64, name="out")
    assert_close(got[1], expected[1], torch.float64, name="last_state")
    cotangents = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
    grads = torch.autograd.grad(got, [tested[n] for n in NAMES], cotangents)
    expected_grads = torch.autograd.grad(expected, [truth[n] for n in NAMES], cotangents)
    for name, grad, expected_grad in zip(NAMES, grads, expected_grads):
        assert_close(grad, expected_grad, torch.float64, name=f"grad {name}")


@pytest.mark.parametrize("which", ["out", "last_state"])
def test_chunked_gradients_of_one_output(which, device):
    """A loss on out alone, or on the last state alone (the other output gets no cotangent)."""
    inputs = make_inputs(2, 6, 5, 45, 2, torch.float32, device)
    truth, tested = leaves(inputs, fp64=True), leaves(inputs)
    index = 0 if which == "out" else 1
    expected = run(truth, "reference", softplus=True)[index]
    got = run(tested, "torch", softplus=True)[index]
    # C, D and z do not reach the last state.
    names = NAMES if which == "out" else [n for n in NAMES if n not in ("C", "D", "z")]
    cotangent = torch.randn_like(expected)
    grads = torch.autograd.grad(got, [tested[n] for n in names], cotangent.to(got.dtype))
    expected_grads = torch.autograd.grad(expected, [truth[n] for n in names], cotangent)
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert_close(grad, expected_grad, torch.float32, scale=2.0, name=f"grad {name}")


def test_chunked_backward_keeps_no_full_size_activations(device):
    """Autograd keeps the inputs and the chunk-entering states, not the (batch, dim, dstate,
    seqlen) states: what it saves stays a fraction of one copy of them."""
    batch, dim, dstate, seqlen = 2, 16, 64, 256
    inputs = leaves(make_inputs(batch, dim, dstate, seqlen, None, torch.float32, device))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = run(inputs, "torch", softplus=True)
    out.sum().backward()
    assert inputs["A"].grad is not None
    states = batch * dim * dstate * seqlen
    assert sum(saved) < states // 2, (sum(saved), states)


def test_empty_sequence_returns_initial_state(device):
    inputs = make_inputs(2, 5, 3, 0, None, torch.float64, device)
    for name in ("reference", "torch"):
        out, last = run(inputs, name, softplus=True)
        assert out.shape == (2, 5, 0)
        assert torch.equal(last, inputs["initial_state"])
    packed = make_inputs(1, 5, 3, 0, None, torch.float64, device, num_states=2)
    out, last = run(packed, "torch", softplus=True, cu_seqlens=torch.tensor([0, 0, 0], device=device))
    assert torch.equal(last, packed["initial_state"])


def test_dispatch_through_backend_block(device):
    inputs = make_inputs(1, 4, 3, 20, None, torch.float64, device)
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C")]
    with use_backend("reference"):
        in_block = selective_scan_fn(*args)
    assert_close(in_block, selective_scan_fn(*args, backend="torch"), torch.float64)
    # The reference is what it claims: the recurrence written out by hand, here for one channel.
    u, delta, B, C = (inputs[n][0] for n in ("u", "delta", "B", "C"))
    A = inputs["A"]
    h, ys = torch.zeros(3, dtype=torch.float64, device=device), []
    for t in range(20):
        h = torch.exp(delta[0, t] * A[0]) * h + delta[0, t] * u[0, t] * B[:, t]
        ys.append((C[:, t] * h).sum())
    assert_close(in_block[0, 0], torch.stack(ys), torch.float64)
    with pytest.raises(ValueError, match="backend"):
        selective_scan_fn(*args, backend="fast")


# Bad input: every error names the argument, raised before any compute.


def _good(device: torch.device) -> dict:
    inputs = make_inputs(2, 6, 4, 10, None, torch.float32, device)
    inputs["initial_state"] = None
    return inputs


BAD = [
    ("u", lambda t: t["u"][0], ValueError, r"u must have shape \(batch, dim, seqlen\)"),
    ("delta", lambda t: t["delta"][..., :-1], ValueError, r"delta must have shape .* got \(2, 6, 9\)"),
    ("A", lambda t: t["A"][:5], ValueError, r"A must have shape \(dim, dstate\) = \(6, \?\)"),
    ("A", lambda t: t["A"].to(torch.complex64), TypeError, r"A must have a floating dtype"),
    ("B", lambda t: t["B"][:, :3], ValueError, r"B must have shape .* = \(2, 4, 10\)"),
    ("B", lambda t: t["B"][:, None, None], ValueError, r"B must have shape \(batch, dstate, seqlen\) .* or"),
    ("C", lambda t: t["C"].view(2, 2, 2, 10), ValueError, r"C must have shape .* got \(2, 2, 2, 10\)"),
    ("B", lambda t: t["B"].view(2, 1, 4, 10).expand(2, 4, 4, 10), ValueError, r"dim \(6\) must be divisible"),
    ("D", lambda t: torch.ones(5), ValueError, r"D must have shape \(dim\) = \(6,\)"),
    ("z", lambda t: t["z"].transpose(1, 2), ValueError, r"z must have shape"),
    ("delta_bias", lambda t: torch.ones(6, 1), ValueError, r"delta_bias must have shape"),
    ("u", lambda t: t["u"].to(torch.int32), TypeError, r"u must have a floating dtype"),
    ("delta", lambda t: t["delta"].double(), TypeError, r"delta must have the dtype of u"),
    ("z", lambda t: t["z"].half(), TypeError, r"z must have the dtype of u"),
    ("C", lambda t: t["C"].tolist(), TypeError, r"C must be a torch.Tensor, got list"),
    ("initial_state", lambda t: t["u"].new_zeros(2, 6, 5), ValueError, r"initial_state must have shape"),
]


@pytest.mark.parametrize("name, corrupt, error, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_naming_argument(name, corrupt, error, message, device):
    inputs = _good(device)
    if name == "B" and "divisible" in message:  # a grouped B needs a grouped C of the same groups
        inputs["C"] = inputs["C"].view(2, 1, 4, 10).expand(2, 4, 4, 10)
    inputs[name] = corrupt(inputs)
    with pytest.raises(error, match=message):
        run(inputs, "torch", softplus=True)


@pytest.mark.parametrize(
    "cu_seqlens, batch, message",
    [
        ([0, 4, 10], 2, r"packed sequences \(cu_seqlens given\) need batch size 1"),
        ([0, 4, 9], 1, r"cu_seqlens must start at 0 and end at seqlen \(10\)"),
        ([0, 6, 4, 10], 1, r"cu_seqlens must be non-decreasing"),
        ([[0, 10]], 1, r"cu_seqlens must have shape \(num_seqs \+ 1,\)"),
    ],
)
def test_bad_cu_seqlens(cu_seqlens, batch, message, device):
    inputs = make_inputs(batch, 6, 4, 10, None, torch.float32, device)
    inputs["initial_state"] = None
    with pytest.raises(ValueError, match=message):
        run(inputs, "torch", softplus=True, cu_seqlens=torch.tensor(cu_seqlens, device=device))


def test_bad_packed_initial_state_and_index_dtype(device):
    inputs = make_inputs(1, 6, 4, 10, None, torch.float32, device, num_states=1)
    message = r"initial_state must have shape \(num_seqs, dim, dstate\) = \(2, 6, 4\)"
    with pytest.raises(ValueError, match=message):
        run(inputs, "torch", softplus=True, cu_seqlens=torch.tensor([0, 4, 10], device=device))
    with pytest.raises(TypeError, match=r"cu_seqlens must have an integer dtype"):
        run(inputs, "torch", softplus=True, cu_seqlens=torch.tensor([0.0, 10.0], device=device))


def test_softplus_matches_torch(device):
    """delta_softplus applies torch's softplus to delta + delta_bias (what mamba_ssm does)."""
    inputs = make_inputs(1, 5, 3, 12, None, torch.float64, device)
    args = [inputs[n] for n in ("u", "delta", "A", "B", "C")]
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    expected = selective_scan_fn(args[0], delta, *args[2:], backend="torch")
    got = selective_scan_fn(*args, delta_bias=inputs["delta_bias"], delta_softplus=True, backend="torch")
    assert_close(got, expected, torch.float64)
