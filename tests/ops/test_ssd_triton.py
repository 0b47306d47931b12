"""Triton SSD kernels (``ssmkit::ssd_fwd`` / ``ssmkit::ssd_bwd``): what the shared parity tests do not
cover, or cover only through the public function.

Forward and every gradient against the fp64 sequential reference (autograd through it is the ground
truth) for odd sizes, ngroups 1 and > 1, lengths that are not multiples of the chunk, seq_idx resets,
packed sequences (with an empty one) and their per-sequence initial and varlen states, dt limits;
every dtype; non-contiguous inputs; what the backward keeps; the custom-op registration (opcheck);
torch.compile with fullgraph=True (Inductor on a GPU, aot_eager on the CPU). On the CPU the kernels
run through Triton's interpreter, so shapes stay tiny there and grow on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.ops import dispatch
from ssmkit.ops.common import seq_idx_from_cu_seqlens
from ssmkit.ops.ssd.reference import ssd_reference
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(
    not dispatch.triton_importable() or (not torch.cuda.is_available() and not dispatch.triton_interpret()),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)

ON_GPU = torch.cuda.is_available()
INF_LIMIT = (0.0, math.inf)
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _ssd_triton():
    from ssmkit.ops.ssd.triton import ssd_triton

    return ssd_triton


def _inputs(
    batch,
    seqlen,
    nheads,
    headdim,
    ngroups,
    dstate,
    dtype,
    device,
    *,
    d_per_channel=False,
    z=True,
    dt_bias=True,
    init_rows=None,
):
    """Random inputs drawn in fp64 and rounded to ``dtype`` (x, B, C, z, dt); A, D, dt_bias and the
    initial states stay fp32 as model parameters usually are (fp64 when dtype is fp64)."""
    param = torch.float64 if dtype == torch.float64 else torch.float32
    g = lambda *shape, dt=dtype: torch.randn(*shape, device=device, dtype=torch.float64).to(dt)
    return {
        "x": g(batch, seqlen, nheads, headdim),
        "dt": (0.5 * g(batch, seqlen, nheads, dt=torch.float64) - 1.0).to(dtype),
        "A": -(0.5 + torch.rand(nheads, device=device, dtype=torch.float64)).to(param),
        "B": g(batch, seqlen, ngroups, dstate),
        "C": g(batch, seqlen, ngroups, dstate),
        "D": g(nheads, headdim, dt=param) if d_per_channel else g(nheads, dt=param),
        "z": g(batch, seqlen, nheads, headdim) if z else None,
        "dt_bias": 0.3 * g(nheads, dt=param) if dt_bias else None,
        "initial_states": g(init_rows, nheads, headdim, dstate, dt=param) if init_rows else None,
    }


def _call(fn, t, chunk_size, seq_idx=None, cu_seqlens=None, dt_limit=INF_LIMIT):
    return fn(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        chunk_size,
        t["D"],
        t["z"],
        t["dt_bias"],
        t["initial_states"],
        seq_idx,
        cu_seqlens,
        True,
        dt_limit,
        True,
        cu_seqlens is not None,
    )


def _compare(tensors, chunk_size, dtype, seq_idx=None, cu_seqlens=None, dt_limit=INF_LIMIT, grad_scale=1.0):
    """Run the kernels and the fp64 reference on the same values; compare outputs and gradients.

    fp64 inputs run in fp32 inside the kernels (cast at the entry), so they get fp32 tolerances."""
    tol_dtype = torch.float32 if dtype == torch.float64 else dtype
    ref_in = {k: None if v is None else v.detach().double().requires_grad_() for k, v in tensors.items()}
    tri_in = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in tensors.items()}
    ref_seq = seq_idx
    if cu_seqlens is not None:
        ref_seq = seq_idx_from_cu_seqlens(cu_seqlens, tensors["x"].shape[1])
    expected = _call(ssd_reference, ref_in, chunk_size, ref_seq, cu_seqlens, dt_limit)
    actual = _call(_ssd_triton(), tri_in, chunk_size, ref_seq, cu_seqlens, dt_limit)
    assert actual[0].dtype == dtype
    assert actual[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, a, e in zip(("out", "final_states", "varlen_states"), actual, expected):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close(a, e, tol_dtype, name=name)
    cotangents = [None if e is None else torch.randn_like(e) for e in expected]
    sum(((e * c).sum() for e, c in zip(expected, cotangents) if e is not None)).backward()
    sum(((a.double() * c).sum() for a, c in zip(actual, cotangents) if a is not None)).backward()
    for name in GRAD_NAMES:
        if tensors[name] is None:
            continue
        grad = tri_in[name].grad
        assert grad is not None and grad.dtype == tensors[name].dtype, name
        assert_close(grad, ref_in[name].grad, tol_dtype, scale=grad_scale, name=f"d{name}")


def _size(cpu: int, gpu: int) -> int:
    return gpu if ON_GPU else cpu


# (batch, seqlen, nheads, headdim, ngroups, dstate, chunk_size)
CASES = [
    pytest.param((2, _size(37, 333), 3, 24, 1, 13, 16), id="g1-odd"),
    pytest.param((1, _size(40, 300), 4, 37, 2, 16, _size(16, 64)), id="g2-p37"),
    pytest.param((1, _size(29, 200), 6, 16, 3, 8, _size(24, 48)), id="g3-chunk24"),
]


@pytest.mark.parametrize("shape", CASES)
def test_forward_backward_fp32(shape, device):
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk = shape
    t = _inputs(
        batch,
        seqlen,
        nheads,
        headdim,
        ngroups,
        dstate,
        torch.float32,
        device,
        d_per_channel=ngroups > 1,
        init_rows=batch,
    )
    _compare(t, chunk, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_dtypes(dtype, device):
    t = _inputs(2, _size(37, 250), 3, 24, 1, 13, dtype, device, init_rows=2)
    # Half precision: the kernels feed tl.dot in the input dtype, the reference runs in fp64.
    _compare(t, _size(16, 64), dtype, grad_scale=1.0 if dtype == torch.float64 else 2.0)


def test_chunk_scan_k_tiles_smaller_than_the_chunk(device):
    # Hopper runs chunk_scan with 32-position K tiles inside 256-position chunks; on the interpreter
    # one tile normally spans the chunk. This forces several M and K tiles per chunk (and a ragged
    # last chunk) through the forward and the backward's recomputation.
    from ssmkit.ops.ssd.triton.config import forced

    t = _inputs(2, _size(70, 333), 3, 24, 1, 13, torch.float32, device, init_rows=2)
    with forced("chunk_scan", block_m=16, block_k=16):
        _compare(t, 32 if not ON_GPU else 128, torch.float32)


def test_seq_idx_resets(device):
    seqlen = _size(40, 300)
    cuts = [0, 10, 17, seqlen] if not ON_GPU else [0, 70, 71, 190, seqlen]
    seq_idx = torch.cat(
        [torch.full((b - a,), i, dtype=torch.int32) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    )
    seq_idx = torch.stack([seq_idx, torch.zeros_like(seq_idx)]).to(device)  # the second row never resets
    t = _inputs(2, seqlen, 4, 16, 2, 16, torch.float32, device, d_per_channel=True, z=False, init_rows=2)
    _compare(t, 16, torch.float32, seq_idx=seq_idx)


@pytest.mark.parametrize("with_init", [True, False], ids=["init", "no-init"])
def test_packed_sequences(with_init, device):
    # An empty sequence in the middle and one at the end; sequences shorter and longer than a chunk.
    lengths = [5, 0, 25, 15, 0] if not ON_GPU else [50, 0, 257, 3, 100, 0]
    cu_seqlens = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
    )
    t = _inputs(
        1, sum(lengths), 2, 8, 1, 16, torch.float32, device, init_rows=len(lengths) if with_init else None
    )
    _compare(t, 16 if not ON_GPU else 64, torch.float32, cu_seqlens=cu_seqlens)


def test_dt_limit_and_no_bias(device):
    t = _inputs(1, _size(33, 200), 2, 16, 1, 16, torch.float32, device, dt_bias=False, z=False)
    _compare(t, 16, torch.float32, dt_limit=(0.2, 0.6))


def test_non_contiguous_inputs(device):
    """Strided views (as produced by splitting a projection) give exactly the contiguous result."""
    batch, seqlen, nheads, headdim, ngroups, dstate = 2, _size(21, 150), 2, 16, 1, 16
    width = 2 * nheads * headdim + 2 * ngroups * dstate + nheads
    proj = torch.randn(batch, seqlen, width, device=device)
    sizes = [nheads * headdim, nheads * headdim, ngroups * dstate, ngroups * dstate, nheads]
    z, x, B, C, dt = torch.split(proj, sizes, dim=-1)
    x = x.unflatten(-1, (nheads, headdim))
    z = z.unflatten(-1, (nheads, headdim))
    B = B.unflatten(-1, (ngroups, dstate))
    C = C.unflatten(-1, (ngroups, dstate))
    D = torch.randn(headdim, nheads, device=device).t()  # (nheads, headdim), transposed strides
    A = -torch.rand(nheads, device=device) - 0.5
    init = torch.randn(nheads, batch, headdim, dstate, device=device).transpose(0, 1)
    assert not x.is_contiguous() and not B.is_contiguous() and not dt.is_contiguous()
    fn = _ssd_triton()
    strided = fn(x, dt, A, B, C, 16, D, z, None, init, None, None, True, INF_LIMIT, True, False)
    dense = fn(
        x.contiguous(),
        dt.contiguous(),
        A,
        B.contiguous(),
        C.contiguous(),
        16,
        D.contiguous(),
        z.contiguous(),
        None,
        init.contiguous(),
        None,
        None,
        True,
        INF_LIMIT,
        True,
        False,
    )
    torch.testing.assert_close(strided[0], dense[0], rtol=0, atol=0)
    torch.testing.assert_close(strided[1], dense[1], rtol=0, atol=0)


def test_backward_keeps_only_inputs_and_chunk_states(device):
    """The autograd graph holds the inputs, the states entering each chunk and dt-sized vectors, not
    the (seqlen, headdim, dstate) activations nor CB."""
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk = 1, 64, 2, 16, 1, 16, 16
    t = _inputs(batch, seqlen, nheads, headdim, ngroups, dstate, torch.float32, device, init_rows=batch)
    t = {k: None if v is None else v.requires_grad_() for k, v in t.items()}
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _call(_ssd_triton(), t, chunk)
    input_ptrs = {v.data_ptr() for v in t.values() if v is not None}
    extra = sum(s.numel() for s in saved if s.data_ptr() not in input_ptrs)
    nchunks = seqlen // chunk
    states = batch * nchunks * nheads * headdim * dstate
    assert extra <= states + 2 * batch * nheads * nchunks * chunk, extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_custom_ops(dtype, device):
    """Schema, fake (shape and dtype) functions, autograd registration and AOT dispatch of
    ssmkit::ssd_fwd and, through its autograd formula, ssmkit::ssd_bwd."""
    _ssd_triton()  # registers the ops
    t = _inputs(1, 20, 2, 16, 1, 16, dtype, device, init_rows=1)
    t = {k: None if v is None else v.requires_grad_() for k, v in t.items()}
    args = (
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        16,
        t["D"],
        t["z"],
        t["dt_bias"],
        t["initial_states"],
        None,
        None,
        True,
        0.0,
        math.inf,
    )
    torch.library.opcheck(torch.ops.ssmkit.ssd_fwd.default, args)
    # The backward op on its own: its fake must give every gradient the real dtype and shape (dx
    # comes back in x's dtype, the others in fp32), or Inductor plans wrong buffers.
    no_grad = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    _, final, _, states, dt_out, cs = torch.ops.ssmkit.ssd_fwd(*no_grad)
    dout = torch.randn_like(no_grad[0])
    bwd_args = (dout, torch.randn_like(final), None, *no_grad, states, dt_out, cs)
    torch.library.opcheck(
        torch.ops.ssmkit.ssd_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor")
    )


def test_torch_compile_fullgraph(device):
    """The custom ops trace without graph breaks, forward and backward. On the CPU the graph runs
    through aot_eager (Inductor would spend half a minute compiling a graph that only calls the
    interpreted kernels); on a GPU through Inductor."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    t = _inputs(2, _size(20, 200), 2, 16, 1, 16, dtype, device, init_rows=2)
    t = {k: None if v is None else v.requires_grad_() for k, v in t.items()}
    fn = _ssd_triton()

    def step(x, dt, A, B, C, D, z, dt_bias, init):
        out, final, _ = fn(x, dt, A, B, C, 16, D, z, dt_bias, init, None, None, True, INF_LIMIT, True, False)
        return out.float().square().sum() + final.sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    args = [t[name] for name in GRAD_NAMES]
    expected = step(*args)
    expected_grads = torch.autograd.grad(expected, args)
    actual = compiled(*args)
    actual_grads = torch.autograd.grad(actual, args)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
