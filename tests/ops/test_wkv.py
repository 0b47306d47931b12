"""WKV: every fast backend against the sequential reference (autograd through the reference in
fp64 is the ground truth for values and gradients), plus the properties a chunked scan must keep:
independence of the chunk size, state passing across calls, packed sequences equal to separate
ones, decode steps equal to the full pass, no overflow at strong decays, and argument checks."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops.wkv import wkv, wkv_step
from tests.helpers import assert_close, backend_params, on_interpreter

BACKENDS = backend_params("ssmkit.ops.wkv")

# (nheads, dk, dv): odd sizes, and a head size that is not a power of two on both sides.
CONFIGS = [
    pytest.param((3, 13, 24), id="h3-dk13-dv24"),
    pytest.param((2, 37, 5), id="h2-dk37-dv5"),
]
DTYPES = [
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def lengths(backend: str) -> tuple[int, int]:
    """(seqlen, chunk_size): several chunks and a partial last one, short enough for the reference."""
    if on_interpreter(backend):
        return 21, 16
    return 45, 16


def make_inputs(device, dtype, batch, seqlen, config, *, w_max: float = 3.0) -> dict[str, torch.Tensor]:
    """Activations (r, k, v) in ``dtype``; the parameters (w, u) and the initial state in fp32 for
    half dtypes, as in a layer. Keys are scaled by 1/sqrt(dk) as a layer's projections would be."""
    nheads, dk, dv = config
    param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    values = {
        "r": torch.randn(batch, seqlen, nheads, dk),
        "k": torch.randn(batch, seqlen, nheads, dk) / dk**0.5,
        "v": torch.randn(batch, seqlen, nheads, dv),
        "w": torch.rand(nheads) * w_max + 0.01,
        "u": torch.randn(nheads, dk),
        "initial_state": torch.randn(batch, nheads, dk, dv),
    }
    params = ("w", "u", "initial_state")
    return {n: t.to(device=device, dtype=param_dtype if n in params else dtype) for n, t in values.items()}


def run_with_grads(inputs, backend, chunk_size, seq_idx=None, grad_dtype=None):
    """Forward (y and final state) and the gradients of a fixed random loss on both outputs.

    The upstream gradient of y is rounded to ``grad_dtype`` (y's dtype in the fast run), so that
    the fp64 reference sees exactly the gradient the fast path receives."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    y, final = wkv(**leaves, return_final_state=True, seq_idx=seq_idx, chunk_size=chunk_size, backend=backend)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen).to(y.device, grad_dtype or y.dtype).double()
    gf = torch.randn(final.shape, generator=gen).to(y.device, torch.float64)
    ((y.double() * gy).sum() + (final.double() * gf).sum()).backward()
    return y, final, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_forward_and_gradients_match_reference(backend, dtype, config, device):
    seqlen, chunk = lengths(backend)
    inputs = make_inputs(device, dtype, 2, seqlen, config)
    exact = {n: t.double() for n, t in inputs.items()}  # the same (rounded) values, in fp64
    y_ref, final_ref, grads_ref = run_with_grads(exact, "reference", chunk, grad_dtype=dtype)
    y, final, grads = run_with_grads(inputs, backend, chunk)
    assert y.dtype == dtype and final.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(y, y_ref, dtype, name="y")
    assert_close(final, final_ref, dtype, name="final_state")
    for name in inputs:
        # Gradients of bf16 activations are rounded to bf16 once more on their way out.
        assert_close(grads[name], grads_ref[name], dtype, scale=2.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_the_result(backend, device):
    seqlen, _ = lengths(backend)
    inputs = make_inputs(device, torch.float64, 2, seqlen, (3, 13, 24))
    y1, f1 = wkv(**inputs, return_final_state=True, chunk_size=4, backend=backend)
    for chunk in (7, 16, seqlen, 1000):
        y2, f2 = wkv(**inputs, return_final_state=True, chunk_size=chunk, backend=backend)
        assert_close(y2, y1, torch.float64, name=f"y chunk {chunk}")
        assert_close(f2, f1, torch.float64, name=f"final chunk {chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_passing_split_equals_one_pass(backend, device):
    seqlen, chunk = lengths(backend)
    inputs = make_inputs(device, torch.float32, 2, seqlen, (3, 13, 24))
    y_full, f_full = wkv(**inputs, return_final_state=True, chunk_size=chunk, backend=backend)
    cut = 19  # inside a chunk
    first = {n: (t[:, :cut] if n in "rkv" else t) for n, t in inputs.items()}
    y1, state = wkv(**first, return_final_state=True, chunk_size=chunk, backend=backend)
    second = {n: t[:, cut:] for n, t in inputs.items() if n in "rkv"}
    y2, f2 = wkv(
        **second, w=inputs["w"], u=inputs["u"], initial_state=state, return_final_state=True,
        chunk_size=chunk, backend=backend,
    )  # fmt: skip
    assert_close(torch.cat([y1, y2], dim=1), y_full, torch.float32, name="y")
    assert_close(f2, f_full, torch.float32, name="final_state")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packing", ["cu_seqlens", "seq_idx"])
def test_packed_sequences_equal_separate_ones(backend, packing, device):
    nheads, dk, dv = 3, 13, 24
    bounds = [0, 5, 5, 23, 24, 40]  # an empty sequence, one of length 1, boundaries mid-chunk
    inputs = make_inputs(device, torch.float64, 1, bounds[-1], (nheads, dk, dv))
    initial = inputs.pop("initial_state")
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    seq_idx = torch.searchsorted(cu_seqlens[1:], torch.arange(bounds[-1], device=device), right=True)[None]
    packed = {"cu_seqlens": cu_seqlens} if packing == "cu_seqlens" else {"seq_idx": seq_idx.to(torch.int32)}
    y, final = wkv(
        **inputs, initial_state=initial, return_final_state=True, chunk_size=8, backend=backend, **packed
    )
    pieces, last = [], None
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        if hi == lo:
            continue
        # The initial state belongs to the first sequence only; the others start from zero.
        start = initial if lo == 0 else None
        part = {n: (t[:, lo:hi] if n in "rkv" else t) for n, t in inputs.items()}
        ys, last = wkv(**part, initial_state=start, return_final_state=True, backend="reference")
        pieces.append(ys)
    assert_close(y, torch.cat(pieces, dim=1), torch.float64, name="y")
    assert_close(final, last, torch.float64, name="final_state (of the last sequence)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_steps_equal_the_full_pass(dtype, device):
    seqlen = 23
    inputs = make_inputs(device, dtype, 2, seqlen, (3, 13, 24))
    y_full, f_full = wkv(**inputs, return_final_state=True, chunk_size=8)
    state = inputs["initial_state"].clone()
    ys = [
        wkv_step(state, inputs["r"][:, t], inputs["k"][:, t], inputs["v"][:, t], inputs["w"], inputs["u"])
        for t in range(seqlen)
    ]
    assert_close(torch.stack(ys, dim=1), y_full, dtype, name="y")
    assert_close(state, f_full, dtype, name="state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strong_decay_stays_finite(backend, device):
    """w up to 40 over chunks of 64: a factorised exp(+w * position) would overflow fp32."""
    inputs = make_inputs(device, torch.float32, 1, 70, (2, 8, 8), w_max=40.0)
    exact = {n: t.double() for n, t in inputs.items()}
    y_ref, f_ref, g_ref = run_with_grads(exact, "reference", 64, grad_dtype=torch.float32)
    y, f, g = run_with_grads(inputs, backend, 64)
    assert_close(y, y_ref, torch.float32, name="y")
    assert_close(f, f_ref, torch.float32, name="final_state")
    assert_close(g["w"], g_ref["w"], torch.float32, scale=2.0, name="grad w")


def test_zero_decay_is_a_running_sum(device):
    """w = 0, u = 0, one key channel of ones: y_t is the sum of the values before t."""
    batch, seqlen, dv = 1, 9, 3
    ones = torch.ones(batch, seqlen, 1, 1, dtype=torch.float64, device=device)
    v = torch.randn(batch, seqlen, 1, dv, dtype=torch.float64, device=device)
    zeros = torch.zeros(1, dtype=torch.float64, device=device)
    y = wkv(ones, ones, v, zeros, zeros[:, None], chunk_size=4)
    expected = torch.cumsum(v, dim=1) - v
    assert_close(y, expected, torch.float64)


def test_bad_inputs_are_named(device):
    inputs = make_inputs(device, torch.float32, 2, 10, (3, 13, 24))
    with pytest.raises(
        ValueError, match=r"k must have shape \(batch, seqlen, nheads, dk\) = \(2, 10, 3, 13\)"
    ):
        wkv(**{**inputs, "k": inputs["k"][..., :5]})
    with pytest.raises(ValueError, match=r"w must have shape \(nheads\) = \(3,\), got \(3, 1\)"):
        wkv(**{**inputs, "w": inputs["w"][:, None]})
    with pytest.raises(ValueError, match=r"u must have shape \(nheads, dk\) = \(3, 13\)"):
        wkv(**{**inputs, "u": inputs["u"].T})
    with pytest.raises(ValueError, match=r"initial_state must have shape \(batch, nheads, dk, dv\)"):
        wkv(**{**inputs, "initial_state": inputs["initial_state"][:, :, :, :3]})
    with pytest.raises(TypeError, match=r"k must have the dtype of r \(torch.float32\), got torch.float64"):
        wkv(**{**inputs, "k": inputs["k"].double()})
    with pytest.raises(TypeError, match=r"r must have a floating dtype"):
        wkv(**{**inputs, "r": inputs["r"].long()})
    with pytest.raises(ValueError, match=r"w must be finite and >= 0"):
        wkv(**{**inputs, "w": -inputs["w"]})
    with pytest.raises(ValueError, match=r"chunk_size must be > 0, got 0"):
        wkv(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match=r"packed sequences \(cu_seqlens given\) need batch size 1"):
        wkv(**inputs, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"seq_idx must be non-decreasing"):
        wkv(**inputs, seq_idx=torch.tensor([[1] * 5 + [0] * 5] * 2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        wkv(**inputs, backend="cuda")
    state = torch.zeros(2, 3, 13, 24, device=device)
    with pytest.raises(ValueError, match=r"v must have shape \(batch, nheads, dv\) = \(2, 3, 24\)"):
        wkv_step(
            state, inputs["r"][:, 0], inputs["k"][:, 0], inputs["v"][:, 0, :, :4], inputs["w"], inputs["u"]
        )
