"""Mamba-2 SSD: every fast backend against the sequential reference (autograd through the
reference in fp64 is the ground truth for values and gradients), plus the properties a chunked
scan must keep: state passing across calls, packed sequences equal to separate ones, resets at
``seq_idx`` changes, mamba_ssm's dt processing, and argument checks naming the culprit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssmkit.ops
from ssmkit.ops.ssd.chunked import block_size
from tests.helpers import assert_close, backend_params, on_interpreter

BACKENDS = backend_params("ssmkit.ops.ssd")
ssd = ssmkit.ops.mamba_chunk_scan_combined

# (nheads, headdim, ngroups, dstate): one group shared by all heads, and three groups of two heads.
CONFIGS = [
    pytest.param((3, 24, 1, 13), id="h3-p24-g1-n13"),
    pytest.param((6, 24, 3, 13), id="h6-p24-g3-n13"),
]
DTYPES = [
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def lengths(backend: str) -> tuple[int, int]:
    """(seqlen, chunk_size): several chunks and a partial last one; tiny under the interpreter,
    longer on a GPU, short enough everywhere for the sequential reference."""
    if on_interpreter(backend):
        return 21, 16
    if torch.cuda.is_available():
        return 200, 64
    return 75, 16


def skip_on_interpreter(backend: str, reason: str) -> None:
    """The CPU interpreter runs kernels ~1000x slower than a GPU: CI runs a representative subset
    there, and every case on the GPU machine."""
    if on_interpreter(backend):
        pytest.skip(f"Triton interpreter: {reason}; runs on GPU")


def tolerance_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    # The Triton kernels compute fp64 inputs in fp32 (tl.dot has no fp64 path on every GPU).
    return torch.float32 if backend == "triton" and dtype == torch.float64 else dtype


def make_inputs(
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    seqlen: int,
    config: tuple[int, int, int, int],
    *,
    D_shape: str = "h",
    num_initial: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random inputs in realistic ranges. Activations (x, dt, B, C, z) take ``dtype``; the
    parameters (A, D, dt_bias) and initial states stay fp32 for half dtypes, as in a Mamba-2 layer."""
    nheads, headdim, ngroups, dstate = config
    param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    values = {
        "x": torch.randn(batch, seqlen, nheads, headdim),
        # Positive steps, usable with and without softplus; decays from exp(-0.02) to exp(-2.2).
        "dt": torch.rand(batch, seqlen, nheads) * 0.45 + 0.05,
        "A": -torch.exp(torch.rand(nheads) * 1.5 - 1.0),
        "B": torch.randn(batch, seqlen, ngroups, dstate),
        "C": torch.randn(batch, seqlen, ngroups, dstate),
        "D": torch.randn(nheads) if D_shape == "h" else torch.randn(nheads, headdim),
        "z": torch.randn(batch, seqlen, nheads, headdim),
        "dt_bias": torch.rand(nheads) - 0.5,
        "initial_states": torch.randn(num_initial or batch, nheads, headdim, dstate),
    }
    params = ("A", "D", "dt_bias", "initial_states")
    return {k: v.to(device=device, dtype=param_dtype if k in params else dtype) for k, v in values.items()}


def leaves(inputs: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached copies (cast to ``dtype`` when given) that require grad."""
    return {k: v.detach().to(dtype or v.dtype).requires_grad_(True) for k, v in inputs.items()}


def call(inputs: dict[str, torch.Tensor], chunk_size: int, backend: str, **kwargs):
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    rest = {k: v for k, v in inputs.items() if k not in ("x", "dt", "A", "B", "C")}
    return ssd(*args, chunk_size, **rest, **kwargs, backend=backend)


SEQUENCE_KEYS = ("x", "dt", "B", "C", "z")
PARAM_KEYS = ("A", "D", "dt_bias")


def part(inputs: dict[str, torch.Tensor], rows: slice, steps: slice) -> dict[str, torch.Tensor]:
    """The inputs of some batch rows over some time steps, without initial states."""
    one = {k: inputs[k][rows, steps] for k in SEQUENCE_KEYS}
    return {**one, **{k: inputs[k] for k in PARAM_KEYS}}


def segments(seq_lengths: list[int], device: torch.device) -> torch.Tensor:
    bounds = torch.tensor([0, *seq_lengths], device=device).cumsum(0)
    return bounds.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Fast backends against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("D_shape", ["h", "hp"])
def test_forward_matches_reference(backend, dtype, config, D_shape, device):
    if dtype != torch.float32 and (config != CONFIGS[1].values[0] or D_shape != "hp"):
        skip_on_interpreter(backend, "fp64 and bf16 run for one layout only")
    seqlen, chunk_size = lengths(backend)
    inputs = make_inputs(device, dtype, 2, seqlen, config, D_shape=D_shape)
    flags = dict(dt_softplus=True, return_final_states=True)
    out, final = call(inputs, chunk_size, backend, **flags)
    ref_out, ref_final = call({k: v.double() for k, v in inputs.items()}, chunk_size, "reference", **flags)
    assert out.dtype == dtype and out.shape == inputs["x"].shape
    # States are carried between calls, so they stay in fp32 (fp64 for fp64 inputs).
    assert final.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = tolerance_dtype(backend, dtype)
    assert_close(out, ref_out, tol, name="out")
    assert_close(final, ref_final, tol, name="final_states")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["plain", "seq_idx", "cu_seqlens"])
def test_gradients_match_reference(backend, dtype, mode, device):
    """Gradients of every input, with the final (and varlen) states in the loss, against autograd
    through the fp64 reference."""
    if dtype != torch.float32 and not (mode == "plain" and dtype == torch.bfloat16):
        skip_on_interpreter(backend, "gradients run in fp32 for every mode, in bf16 for the plain one")
    seqlen, chunk_size = lengths(backend)
    config = CONFIGS[1].values[0]
    flags: dict = dict(dt_softplus=True, dt_limit=(0.01, 2.0), return_final_states=True)
    if mode == "cu_seqlens":
        # Boundaries off the chunk grid, one inside the first chunk, and an empty sequence.
        cuts = [3, seqlen // 2, seqlen // 2, seqlen - 2]
        flags.update(cu_seqlens=torch.tensor([0, *cuts, seqlen], device=device, dtype=torch.int32))
        flags.update(return_varlen_states=True)
        inputs = make_inputs(device, dtype, 1, seqlen, config, D_shape="hp", num_initial=len(cuts) + 1)
    else:
        inputs = make_inputs(device, dtype, 2, seqlen, config, D_shape="hp")
        if mode == "seq_idx":
            first = [0] * 5 + [1] * (seqlen - 12) + [2] * 7
            flags.update(seq_idx=torch.tensor([first, [0] * seqlen], device=device, dtype=torch.int32))

    fast_leaves = leaves(inputs)
    ref_leaves = leaves(inputs, torch.float64)
    fast = call(fast_leaves, chunk_size, backend, **flags)
    ref = call(ref_leaves, chunk_size, "reference", **flags)
    weights = [torch.randn(t.shape, device=device, dtype=torch.float64) for t in ref]
    fast_loss = sum((t.double() * w).sum() for t, w in zip(fast, weights))
    ref_loss = sum((t * w).sum() for t, w in zip(ref, weights))
    names = list(fast_leaves)
    fast_grads = torch.autograd.grad(fast_loss, [fast_leaves[k] for k in names])
    ref_grads = torch.autograd.grad(ref_loss, [ref_leaves[k] for k in names])

    tol = tolerance_dtype(backend, dtype)
    for i, name in enumerate(["out", "final_states", "varlen_states"][: len(fast)]):
        assert_close(fast[i], ref[i], tol, name=name)
    for name, grad, ref_grad in zip(names, fast_grads, ref_grads):
        assert grad.dtype == fast_leaves[name].dtype
        # dA and d(dt_bias) are sums over every position of terms of both signs: in fp32 they keep
        # fewer correct digits than the elementwise gradients (an H100 measured dA 1.4e-5 off with
        # packed sequences, the others within 1e-5).
        scale = 4.0 if name in ("A", "dt_bias") else 1.0
        assert_close(grad, ref_grad, tol, scale=scale, name=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_and_chunk_sizes(backend, device):
    """Sequences shorter than, equal to and not a multiple of the chunk, and chunk sizes down to 1."""
    config = CONFIGS[0].values[0]
    cases = [(1, 8), (7, 8), (19, 8), (19, 5)]
    if not on_interpreter(backend):
        cases += [(8, 8), (19, 1), (33, 16), (40, 256)]
    dtype = torch.float32 if backend == "triton" else torch.float64
    for seqlen, chunk_size in cases:
        inputs = make_inputs(device, dtype, 2, seqlen, config)
        out, final = call(inputs, chunk_size, backend, dt_softplus=True, return_final_states=True)
        ref = call({k: v.double() for k, v in inputs.items()}, chunk_size, "reference", dt_softplus=True,
                   return_final_states=True)  # fmt: skip
        assert_close(out, ref[0], dtype, name=f"out (seqlen {seqlen}, chunk {chunk_size})")
        assert_close(final, ref[1], dtype, name=f"final_states (seqlen {seqlen}, chunk {chunk_size})")


def test_torch_result_does_not_depend_on_chunk_size(device):
    config = CONFIGS[1].values[0]
    inputs = make_inputs(device, torch.float64, 2, 50, config)
    outs = [call(inputs, chunk_size, "torch", dt_softplus=True) for chunk_size in (1, 4, 16, 50, 256)]
    for out in outs[1:]:
        assert_close(out, outs[0], torch.float64)


def test_block_size_caps_long_chunks():
    # mamba_ssm's default chunk of 256 runs in blocks of 64 for headdim 64, dstate 128 on the CPU
    # path; small chunks and short sequences are taken as they are.
    assert block_size(256, 2048, 64, 128) == 64
    assert block_size(8, 2048, 64, 128) == 8
    assert block_size(256, 10, 64, 128) == 10
    assert block_size(256, 2048, 24, 13) == 16


# ---------------------------------------------------------------------------------------------
# Semantics: state passing, packed sequences, resets, dt processing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_sequence_equals_one_pass(backend, device):
    """Running [0, k) then [k, seqlen) from the first part's final state equals one pass."""
    seqlen, chunk_size = lengths(backend)
    inputs = make_inputs(device, torch.float32, 2, seqlen, CONFIGS[1].values[0])
    full, full_final = call(inputs, chunk_size, backend, dt_softplus=True, return_final_states=True)
    split = chunk_size + 3  # not on the chunk grid
    head = part(inputs, slice(None), slice(0, split))
    head["initial_states"] = inputs["initial_states"]
    out1, final1 = call(head, chunk_size, backend, dt_softplus=True, return_final_states=True)
    tail = part(inputs, slice(None), slice(split, None))
    tail["initial_states"] = final1
    out2, final2 = call(tail, chunk_size, backend, dt_softplus=True, return_final_states=True)
    assert_close(torch.cat([out1, out2], dim=1), full, torch.float32, name="out")
    assert_close(final2, full_final, torch.float32, name="final_states")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_initial_states", [True, False], ids=["initial", "zero"])
def test_packed_sequences_equal_one_by_one(backend, with_initial_states, device):
    """A cu_seqlens batch gives, sequence by sequence, what separate calls give: outputs, the
    state after each sequence (varlen_states), and per-sequence initial states."""
    if not with_initial_states:
        skip_on_interpreter(backend, "the zero-initial-state variant")
    seq_lengths = [3, 0, 9, 1, 6] if on_interpreter(backend) else [5, 0, 12, 1, 19, 38]
    _, chunk_size = lengths(backend)
    seqlen = sum(seq_lengths)
    inputs = make_inputs(device, torch.float32, 1, seqlen, CONFIGS[1].values[0], num_initial=len(seq_lengths))
    if not with_initial_states:
        del inputs["initial_states"]
    cu_seqlens = segments(seq_lengths, device)
    out, final, varlen = call(inputs, chunk_size, backend, cu_seqlens=cu_seqlens, dt_softplus=True,
                              return_final_states=True, return_varlen_states=True)  # fmt: skip
    assert varlen.shape == (len(seq_lengths), *final.shape[1:])

    outs, last_state = [], None
    for s, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        own_initial = inputs["initial_states"][s : s + 1] if with_initial_states else None
        if start == end:  # no step: the sequence ends in the state it started from
            expected = own_initial[0] if with_initial_states else torch.zeros_like(varlen[s])
            assert_close(varlen[s], expected, torch.float32, name=f"varlen_states[{s}] (empty)")
            continue
        one = part(inputs, slice(None), slice(start, end))
        one["initial_states"] = own_initial
        out_s, state_s = call(one, chunk_size, backend, dt_softplus=True, return_final_states=True)
        outs.append(out_s)
        last_state = state_s[0]
        assert_close(varlen[s], state_s[0], torch.float32, name=f"varlen_states[{s}]")
    assert_close(out, torch.cat(outs, dim=1), torch.float32, name="out")
    assert_close(final[0], last_state, torch.float32, name="final_states")


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_idx_resets_state(backend, device):
    """Where seq_idx changes the state restarts from zero: each segment equals a separate call,
    and only the first segment of a row sees that row's initial state."""
    seqlen, chunk_size = lengths(backend)
    inputs = make_inputs(device, torch.float32, 2, seqlen, CONFIGS[0].values[0])
    cuts = [0, 3, chunk_size, chunk_size + 2, seqlen]  # one boundary on the chunk grid
    row0 = sum(([i] * (b - a) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))), [])
    seq_idx = torch.tensor([row0, [7] * seqlen], device=device, dtype=torch.int32)
    out, final = call(
        inputs, chunk_size, backend, seq_idx=seq_idx, dt_softplus=True, return_final_states=True
    )

    for i, (start, end) in enumerate(zip(cuts[:-1], cuts[1:])):
        one = part(inputs, slice(0, 1), slice(start, end))
        if i == 0:
            one["initial_states"] = inputs["initial_states"][:1]
        out_i, final_i = call(one, chunk_size, backend, dt_softplus=True, return_final_states=True)
        assert_close(out[:1, start:end], out_i, torch.float32, name=f"out of segment {i}")
    assert_close(final[:1], final_i, torch.float32, name="final_states (row 0)")
    # Row 1 never changes its seq_idx: it is an ordinary sequence.
    row1 = part(inputs, slice(1, 2), slice(None))
    row1["initial_states"] = inputs["initial_states"][1:]
    plain = call(row1, chunk_size, backend, dt_softplus=True, return_final_states=True)
    assert_close(out[1:], plain[0], torch.float32, name="out (row 1)")
    assert_close(final[1:], plain[1], torch.float32, name="final_states (row 1)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_with_matching_seq_idx(backend, device):
    seq_lengths = [4, 0, 9, 8]
    inputs = make_inputs(device, torch.float32, 1, sum(seq_lengths), CONFIGS[0].values[0], num_initial=4)
    cu_seqlens = segments(seq_lengths, device)
    seq_idx = torch.tensor([[5] * 4 + [9] * 9 + [11] * 8], device=device)  # any labels, same boundaries
    alone = call(inputs, 8, backend, cu_seqlens=cu_seqlens, return_varlen_states=True)
    both = call(inputs, 8, backend, cu_seqlens=cu_seqlens, seq_idx=seq_idx, return_varlen_states=True)
    for a, b in zip(alone, both):
        assert_close(b, a, torch.float32)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_dt_processing_matches_mamba_ssm(backend, device):
    """dt + dt_bias, softplus, then the clamp to dt_limit, the clamp skipped for the default limit
    (mamba_ssm leaves negative steps alone then)."""
    seqlen, chunk_size = lengths(backend if backend != "reference" else "torch")
    inputs = make_inputs(device, torch.float32, 2, seqlen, CONFIGS[0].values[0])
    dt, dt_bias = inputs.pop("dt"), inputs.pop("dt_bias")
    limit = (0.6, 0.9)  # softplus(dt + dt_bias) spans about 0.49 .. 1.31: both ends bite
    out = call(
        {**inputs, "dt": dt, "dt_bias": dt_bias}, chunk_size, backend, dt_softplus=True, dt_limit=limit
    )
    processed = F.softplus(dt + dt_bias).clamp(*limit)
    expected = call({**inputs, "dt": processed}, chunk_size, backend)
    assert_close(out, expected, torch.float32, name="softplus + dt_limit")
    assert not torch.equal(processed, F.softplus(dt + dt_bias))  # the clamp did bite

    negative = -torch.rand_like(dt) * 0.1  # negative steps, no softplus: default limit keeps them
    default = call({**inputs, "dt": negative}, chunk_size, backend)
    unclamped = call({**inputs, "dt": negative}, chunk_size, backend, dt_limit=(-float("inf"), float("inf")))
    assert_close(default, unclamped, torch.float32, name="default dt_limit")
    assert default.abs().max() > 0


def test_reference_on_a_hand_computed_case():
    """Two steps, one head, headdim 1, dstate 2, worked out by hand from the recurrence."""
    x = torch.tensor([2.0, -1.0], dtype=torch.float64).view(1, 2, 1, 1)
    dt = torch.tensor([0.5, 0.25], dtype=torch.float64).view(1, 2, 1)
    A = torch.tensor([-2.0], dtype=torch.float64)
    B = torch.tensor([[1.0, 3.0], [2.0, -1.0]], dtype=torch.float64).view(1, 2, 1, 2)
    C = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=torch.float64).view(1, 2, 1, 2)
    D = torch.tensor([0.1], dtype=torch.float64)
    state1 = 0.5 * 2.0 * torch.tensor([1.0, 3.0], dtype=torch.float64)
    state2 = torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * state1 + 0.25 * -1.0 * torch.tensor(
        [2.0, -1.0]
    )
    y1 = state1 @ torch.tensor([1.0, 1.0], dtype=torch.float64) + 0.1 * 2.0
    y2 = state2 @ torch.tensor([0.5, 2.0], dtype=torch.float64) + 0.1 * -1.0
    for backend in ("reference", "torch"):
        out, final = ssd(x, dt, A, B, C, 1, D=D, return_final_states=True, backend=backend)
        torch.testing.assert_close(out.flatten(), torch.stack([y1, y2]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final.flatten(), state2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Interface: returns, dispatch, input layouts, bad input
# ---------------------------------------------------------------------------------------------


def test_return_structure_follows_mamba_ssm(device):
    inputs = make_inputs(device, torch.float32, 1, 12, CONFIGS[0].values[0], num_initial=2)
    cu_seqlens = segments([5, 7], device)
    assert isinstance(call(inputs, 8, "torch", cu_seqlens=cu_seqlens), torch.Tensor)
    assert len(call(inputs, 8, "torch", cu_seqlens=cu_seqlens, return_final_states=True)) == 2
    out, varlen = call(inputs, 8, "torch", cu_seqlens=cu_seqlens, return_varlen_states=True)
    assert varlen.shape == (2, 3, 24, 13)
    out, final, varlen = call(inputs, 8, "torch", cu_seqlens=cu_seqlens, return_final_states=True,
                              return_varlen_states=True)  # fmt: skip
    assert final.shape == (1, 3, 24, 13)
    assert_close(final[0], varlen[-1], torch.float32)


def test_dispatch(device):
    inputs = make_inputs(device, torch.float64, 1, 10, CONFIGS[0].values[0])
    from ssmkit.ops.ssd.interface import mamba_chunk_scan_combined

    assert ssd is mamba_chunk_scan_combined
    ref = call(inputs, 4, "reference")
    with ssmkit.ops.backend("reference"):
        assert torch.equal(call(inputs, 4, None), ref)
    if device.type == "cpu":  # "auto" on the CPU is the PyTorch path
        assert torch.equal(call(inputs, 4, None), call(inputs, 4, "torch"))


def test_non_contiguous_inputs(device):
    inputs = make_inputs(device, torch.float32, 2, 30, CONFIGS[1].values[0])
    strided = {}
    for k, v in inputs.items():
        # Same values, other memory layouts: a transposed copy viewed back, and a strided slice.
        if v.dim() >= 3:
            strided[k] = v.transpose(0, 1).contiguous().transpose(0, 1)
        else:
            strided[k] = torch.stack([v, v], dim=-1)[..., 0]
        assert torch.equal(strided[k], v)
    for backend in ("torch", "reference"):
        assert_close(call(strided, 8, backend), call(inputs, 8, backend), torch.float32)


def _bad(device, **changes):
    """Valid arguments (batch 2, seqlen 10, nheads 4, headdim 8, ngroups 2, dstate 5) with
    ``changes`` applied; values that are callables receive the valid inputs."""
    kw = make_inputs(device, torch.float32, 2, 10, (4, 8, 2, 5))
    kw["chunk_size"] = 4
    for key, value in changes.items():
        kw[key] = value(kw) if callable(value) else value
    return kw


def on_device(value):
    """A tensor built from ``value`` on the inputs' device (for the bad-input table)."""
    return lambda k: torch.tensor(value, device=k["x"].device)


BAD_INPUTS = {
    "x_rank": (
        dict(x=lambda k: k["x"][..., 0]),
        ValueError,
        r"x must have shape \(batch, seqlen, nheads, headdim\)",
    ),
    "x_type": (dict(x=lambda k: k["x"].tolist()), TypeError, r"x must be a torch.Tensor, got list"),
    "x_int": (dict(x=lambda k: k["x"].int()), TypeError, r"x must have a floating dtype"),
    "dt_shape": (
        dict(dt=lambda k: k["dt"][:, :-1]),
        ValueError,
        r"dt must have shape \(batch, seqlen, nheads\) = \(2, 10, 4\), got \(2, 9, 4\)",
    ),
    "A_shape": (
        dict(A=lambda k: k["A"][:, None]),
        ValueError,
        r"A must have shape \(nheads\) = \(4,\), got \(4, 1\)",
    ),
    "B_seqlen": (
        dict(B=lambda k: k["B"][:, :7]),
        ValueError,
        r"B must have shape \(batch, seqlen, ngroups, dstate\) = \(2, 10, \?, \?\), got \(2, 7, 2, 5\)",
    ),
    "C_vs_B": (
        dict(C=lambda k: k["C"][..., :4]),
        ValueError,
        r"C must have shape .* = \(2, 10, 2, 5\), got \(2, 10, 2, 4\)",
    ),
    "groups": (
        dict(
            B=lambda k: k["B"][:, :, :1].expand(2, 10, 3, 5), C=lambda k: k["C"][:, :, :1].expand(2, 10, 3, 5)
        ),
        ValueError,
        r"nheads \(4\) must be divisible by ngroups \(3\)",
    ),
    "B_dtype": (
        dict(B=lambda k: k["B"].double()),
        TypeError,
        r"B must have the dtype of x \(torch.float32\), got torch.float64",
    ),
    "z_dtype": (dict(z=lambda k: k["z"].bfloat16()), TypeError, r"z must have the dtype of x"),
    "D_shape": (
        dict(D=lambda k: k["D"].repeat(2)),
        ValueError,
        r"D must have shape \(nheads\) = \(4,\) or \(nheads, headdim\) = \(4, 8\), got \(8,\)",
    ),
    "z_shape": (dict(z=lambda k: k["z"][..., :3]), ValueError, r"z must have shape"),
    "dt_bias_shape": (
        dict(dt_bias=lambda k: k["dt_bias"][:2]),
        ValueError,
        r"dt_bias must have shape \(nheads\) = \(4,\), got \(2,\)",
    ),
    "initial_states_shape": (
        dict(initial_states=lambda k: k["initial_states"][..., :2]),
        ValueError,
        r"initial_states must have shape \(batch, nheads, headdim, dstate\) = \(2, 4, 8, 5\), "
        r"got \(2, 4, 8, 2\)",
    ),
    "chunk_size_zero": (dict(chunk_size=0), ValueError, r"chunk_size must be > 0, got 0"),
    "chunk_size_float": (dict(chunk_size=4.0), TypeError, r"chunk_size must be an int, got float"),
    "dt_limit_order": (dict(dt_limit=(1.0, 0.5)), ValueError, r"dt_limit must satisfy min <= max"),
    "dt_limit_len": (dict(dt_limit=(0.1,)), ValueError, r"dt_limit must be a pair"),
    "seq_idx_dtype": (
        dict(seq_idx=on_device([[0.0] * 10] * 2)),
        TypeError,
        r"seq_idx must have an integer dtype",
    ),
    "seq_idx_shape": (
        dict(seq_idx=on_device([[0] * 9] * 2)),
        ValueError,
        r"seq_idx must have shape \(batch, seqlen\) = \(2, 10\)",
    ),
    "seq_idx_order": (
        dict(seq_idx=on_device([[0] * 5 + [1] * 5, [1] * 5 + [0] * 5])),
        ValueError,
        r"must be non-decreasing",
    ),
    "varlen_alone": (
        dict(return_varlen_states=True),
        ValueError,
        r"return_varlen_states=True needs cu_seqlens",
    ),
    "cu_seqlens_batch": (
        dict(cu_seqlens=on_device([0, 4, 10])),
        ValueError,
        r"need batch size 1, got batch 2",
    ),
    "device": (dict(A=lambda k: k["A"].to("meta")), ValueError, r"A must be on the same device as x"),
}


@pytest.mark.parametrize(
    ("changes", "error", "match"), [pytest.param(*v, id=k) for k, v in BAD_INPUTS.items()]
)
def test_bad_input_names_the_argument(changes, error, match, device):
    kwargs = _bad(device, **changes)
    with pytest.raises(error, match=match):
        ssd(**kwargs, backend="torch")


PACKED_BAD_INPUTS = {
    "cu_seqlens_end": (
        dict(cu_seqlens=[0, 4, 9]),
        ValueError,
        r"cu_seqlens must start at 0 and end at seqlen \(10\), got 0 .. 9",
    ),
    "cu_seqlens_dtype": (
        dict(cu_seqlens=[0.0, 4.0, 10.0]),
        TypeError,
        r"cu_seqlens must have an integer dtype",
    ),
    "cu_seqlens_order": (dict(cu_seqlens=[0, 6, 4, 10]), ValueError, r"cu_seqlens must be non-decreasing"),
    "initial_states_rows": (
        dict(cu_seqlens=[0, 4, 6, 10], initial_states=2),
        ValueError,
        r"initial_states must have shape \(num_seqs, nheads, headdim, dstate\) = \(3, 4, 8, 5\), "
        r"got \(2, 4, 8, 5\)",
    ),
    "seq_idx_disagrees": (
        dict(cu_seqlens=[0, 4, 10], seq_idx=[0] * 5 + [1] * 5),
        ValueError,
        r"seq_idx and cu_seqlens disagree",
    ),
}


@pytest.mark.parametrize(
    ("changes", "error", "match"), [pytest.param(*v, id=k) for k, v in PACKED_BAD_INPUTS.items()]
)
def test_bad_packed_input_names_the_argument(changes, error, match, device):
    num_initial = changes.get("initial_states", 2)
    kwargs = make_inputs(device, torch.float32, 1, 10, (4, 8, 2, 5), num_initial=num_initial)
    kwargs["cu_seqlens"] = torch.tensor(changes["cu_seqlens"], device=device)
    if "seq_idx" in changes:
        kwargs["seq_idx"] = torch.tensor([changes["seq_idx"]], device=device)
    with pytest.raises(error, match=match):
        ssd(chunk_size=4, **kwargs, backend="torch")


def test_unknown_backend_is_rejected(device):
    with pytest.raises(ValueError, match="backend must be one of"):
        call(make_inputs(device, torch.float32, 1, 4, (2, 4, 1, 3)), 4, "cuda")
