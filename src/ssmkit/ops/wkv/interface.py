"""``wkv`` and ``wkv_step``: the public WKV functions (checks, then dispatch).

Backends of :func:`wkv` share one signature and return pair, so they are interchangeable:

    fn(r, k, v, w, u, initial_state, seq_idx, chunk_size) -> (y, final_state)

Arguments reach a backend checked; ``seq_idx`` is None or int (batch, seqlen), derived from
``cu_seqlens`` when that is given. The reference and the PyTorch path get their gradients from
autograd.
"""

from __future__ import annotations

import numbers

import torch

from ssmkit.ops import checks
from ssmkit.ops.common import compute_dtype, seq_idx_from_cu_seqlens
from ssmkit.ops.dispatch import resolve

_OP_PACKAGE = "ssmkit.ops.wkv"


def wkv(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RWKV-style WKV recurrence with a matrix state per head (see :mod:`ssmkit.ops.wkv`).

    r, k: (batch, seqlen, nheads, dk) receptance and keys   v: (batch, seqlen, nheads, dv)
    w: (nheads,) decay, >= 0: the state is multiplied by exp(-w) per step
    u: (nheads, dk) bonus ("time_first") of the current token
    initial_state: (batch, nheads, dk, dv), the state S_{-1} before position 0
    seq_idx: (batch, seqlen) int, non-decreasing; the state restarts from zero where it changes
    cu_seqlens: (num_seqs + 1,) int, boundaries of sequences packed into batch 1; it implies the
    restarts (a packed batch gives what the sequences give one by one). ``initial_state`` enters
    at position 0 only, i.e. belongs to the first sequence.

    Per head and step: ``y_t = r_t @ (S_{t-1} + (u * k_t)^T v_t)``, ``S_t = exp(-w) S_{t-1} + k_t^T v_t``.
    ``chunk_size`` sets the blocking of the fast path, not the result.

    Returns y: (batch, seqlen, nheads, dv) in r's dtype; with ``return_final_state`` also the state
    after the last position, (batch, nheads, dk, dv) in fp32 (fp64 for fp64 inputs).
    backend: "auto", "reference", "torch" or "triton" (see :mod:`ssmkit.ops.dispatch`).
    """
    seq_idx = _check(r, k, v, w, u, initial_state, seq_idx, cu_seqlens, chunk_size)
    implementation = resolve(_OP_PACKAGE, backend, r.device)
    if implementation == "reference":
        from ssmkit.ops.wkv.reference import wkv_reference as fn
    elif implementation == "torch":
        from ssmkit.ops.wkv.chunked import wkv_chunked as fn
    else:
        from ssmkit.ops.wkv.triton import wkv_triton as fn
    y, final_state = fn(r, k, v, w, u, initial_state, seq_idx, int(chunk_size))
    return (y, final_state) if return_final_state else y


def wkv_step(
    state: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One decode step of :func:`wkv`; updates ``state`` in place and returns y.

    state: (batch, nheads, dk, dv) float, S_{t-1} on entry and S_t on return
    r, k: (batch, nheads, dk)   v: (batch, nheads, dv)   w: (nheads,)   u: (nheads, dk)
    Returns y: (batch, nheads, dv) in r's dtype. No value checks (w >= 0 is the caller's
    promise here): the decode path stays free of host synchronisation.
    """
    checks.tensor("state", state)
    checks.shape("state", state, [("batch", None), ("nheads", None), ("dk", None), ("dv", None)])
    checks.floating("state", state)
    batch, nheads, dk, dv = state.shape
    for name, value, last in (("r", r, ("dk", dk)), ("k", k, ("dk", dk)), ("v", v, ("dv", dv))):
        checks.tensor(name, value)
        checks.shape(name, value, [("batch", batch), ("nheads", nheads), last])
        checks.floating(name, value)
    checks.same_dtype("r", r, k=k, v=v)
    _check_parameters(w, u, nheads, dk)
    checks.same_device("state", state, r=r, k=k, v=v, w=w, u=u)
    if state.is_leaf and state.requires_grad:
        raise ValueError("state is updated in place and cannot be a leaf tensor that requires grad")
    resolve(_OP_PACKAGE, backend, r.device)  # validates the name; one PyTorch step serves every backend

    # The state's precision, at least fp32: the step must match what the scan keeps between calls.
    dtype = torch.promote_types(compute_dtype(r.dtype), state.dtype)
    rf, kf, vf = r.to(dtype), k.to(dtype), v.to(dtype)
    current = state.to(dtype)
    kv = kf[..., :, None] * vf[..., None, :]  # (batch, nheads, dk, dv)
    y = torch.einsum("bhk,bhkv->bhv", rf, current + u.to(dtype)[None, :, :, None] * kv)
    state.copy_(torch.exp(-w.to(dtype))[None, :, None, None] * current + kv)
    return y.to(r.dtype)


def _check_parameters(w: object, u: object, nheads: int, dk: int) -> None:
    checks.tensor("w", w)
    checks.shape("w", w, [("nheads", nheads)])
    checks.floating("w", w)
    checks.tensor("u", u)
    checks.shape("u", u, [("nheads", nheads), ("dk", dk)])
    checks.floating("u", u)


def _check(r, k, v, w, u, initial_state, seq_idx, cu_seqlens, chunk_size) -> torch.Tensor | None:
    """Validate every argument before any compute; return seq_idx as the backends want it."""
    checks.tensor("r", r)
    checks.shape("r", r, [("batch", None), ("seqlen", None), ("nheads", None), ("dk", None)])
    checks.floating("r", r)
    if r.numel() == 0:
        raise ValueError(f"r must be non-empty, got shape {tuple(r.shape)}")
    batch, seqlen, nheads, dk = r.shape
    checks.tensor("k", k)
    checks.shape("k", k, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads), ("dk", dk)])
    checks.tensor("v", v)
    checks.shape("v", v, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads), ("dv", None)])
    if v.shape[-1] == 0:
        raise ValueError(f"v must have dv >= 1, got shape {tuple(v.shape)}")
    dv = v.shape[-1]
    # r, k and v come out of the same projections: one dtype. w, u and initial_state may be any
    # float dtype (parameters are often kept in fp32).
    checks.same_dtype("r", r, k=k, v=v)
    _check_parameters(w, u, nheads, dk)

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")

    if initial_state is not None:
        checks.tensor("initial_state", initial_state)
        dims = [("batch", batch), ("nheads", nheads), ("dk", dk), ("dv", dv)]
        checks.shape("initial_state", initial_state, dims)
        checks.floating("initial_state", initial_state)
    if seq_idx is not None:
        checks.tensor("seq_idx", seq_idx)
        checks.shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
        checks.integer("seq_idx", seq_idx)
    if cu_seqlens is not None:
        checks.tensor("cu_seqlens", cu_seqlens)
        checks.same_device("r", r, cu_seqlens=cu_seqlens)
        checks.cu_seqlens("cu_seqlens", cu_seqlens, seqlen, batch)
    checks.same_device("r", r, k=k, v=v, w=w, u=u, initial_state=initial_state, seq_idx=seq_idx)

    # Value checks last: they read tensor contents (a device sync on GPUs).
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"w must be finite and >= 0 (the state decays by exp(-w) per step), got {w.tolist()}"
        )
    if seq_idx is not None and seqlen > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along seqlen (it numbers the packed sequences)")
    if cu_seqlens is None:
        return seq_idx
    derived = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)
    if seq_idx is not None and not torch.equal(
        seq_idx[:, 1:] != seq_idx[:, :-1], derived[:, 1:] != derived[:, :-1]
    ):
        raise ValueError(
            "seq_idx and cu_seqlens disagree on where sequences start: pass one of them, or both "
            f"with the same boundaries (cu_seqlens = {cu_seqlens.tolist()})"
        )
    return derived
