"""``mamba_chunk_scan_combined``: the public Mamba-2 SSD function (checks, then dispatch).

Backends share one canonical signature and return triple, so they are interchangeable:

    fn(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
       dt_softplus, dt_limit, return_final_states, return_varlen_states)
        -> (out, final_states or None, varlen_states or None)

Arguments reach a backend checked; ``seq_idx`` is int32 (batch, seqlen), and whenever
``cu_seqlens`` is given it is the one derived from it (the index of each position's sequence).
The reference and the PyTorch path get their gradients from autograd; the Triton path brings
its own backward.
"""

from __future__ import annotations

import math
import numbers

import torch

from ssmkit.ops import checks
from ssmkit.ops.common import seq_idx_from_cu_seqlens
from ssmkit.ops.dispatch import resolve

_OP_PACKAGE = "ssmkit.ops.ssd"


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Mamba-2 SSD chunked scan, compatible with ``mamba_ssm``'s function of the same name.

    x: (batch, seqlen, nheads, headdim)   dt: (batch, seqlen, nheads)   A: (nheads,)
    B, C: (batch, seqlen, ngroups, dstate), nheads divisible by ngroups; head h reads group
    h // (nheads // ngroups)
    D: (nheads,) or (nheads, headdim)   z: (batch, seqlen, nheads, headdim)   dt_bias: (nheads,)
    initial_states: (batch, nheads, headdim, dstate), or (num_seqs, nheads, headdim, dstate)
    with cu_seqlens (one per packed sequence)
    seq_idx: (batch, seqlen) int, non-decreasing; the state restarts from zero where it changes
    cu_seqlens: (num_seqs + 1,) int, boundaries of sequences packed into batch 1 (flash-attn
    convention); without seq_idx it implies the restarts, so a packed batch gives what the
    sequences give one by one

    dt is processed as in mamba_ssm: ``dt + dt_bias``, softplus when ``dt_softplus``, clamp to
    ``dt_limit`` when that is not ``(0, inf)``. Then per step:
    ``state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T``, ``y_t = state_t C_t + D x_t``, and
    ``y_t * silu(z_t)`` when z is given. ``chunk_size`` sets the kernels' blocking, not the result.

    Returns out: (batch, seqlen, nheads, headdim) in x's dtype; with ``return_final_states`` also
    final_states (batch, nheads, headdim, dstate); with ``return_varlen_states`` (needs
    cu_seqlens) also varlen_states (num_seqs, nheads, headdim, dstate), the state after each
    packed sequence. States are fp32 (fp64 for fp64 inputs). Order as in mamba_ssm: ``out``,
    ``(out, final_states)``, ``(out, varlen_states)`` or ``(out, final_states, varlen_states)``.
    backend: "auto", "reference", "torch" or "triton" (see :mod:`ssmkit.ops.dispatch`).
    """
    seq_idx = _check(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit,
        return_varlen_states,
    )  # fmt: skip
    implementation = resolve(_OP_PACKAGE, backend, x.device)
    if implementation == "reference":
        from ssmkit.ops.ssd.reference import ssd_reference as fn
    elif implementation == "torch":
        from ssmkit.ops.ssd.chunked import ssd_chunked as fn
    else:
        from ssmkit.ops.ssd.triton import ssd_triton as fn
    # The operator chooses its own precision (fp32 inside for half inputs): an enclosing autocast
    # region must not recast its internal matmuls to bf16.
    with torch.autocast(x.device.type, enabled=False):
        out, final_states, varlen_states = fn(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
            bool(dt_softplus), (float(dt_limit[0]), float(dt_limit[1])),
            bool(return_final_states), bool(return_varlen_states),
        )  # fmt: skip
    if not return_final_states and not return_varlen_states:
        return out
    results = [out]
    if return_final_states:
        results.append(final_states)
    if return_varlen_states:
        results.append(varlen_states)
    return tuple(results)


def _check(
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit,
    return_varlen_states,
) -> torch.Tensor | None:  # fmt: skip
    """Validate every argument before any compute; return seq_idx as the backends want it."""
    checks.tensor("x", x)
    checks.shape("x", x, [("batch", None), ("seqlen", None), ("nheads", None), ("headdim", None)])
    checks.floating("x", x)
    batch, seqlen, nheads, headdim = x.shape
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")

    checks.tensor("B", B)
    checks.shape("B", B, [("batch", batch), ("seqlen", seqlen), ("ngroups", None), ("dstate", None)])
    ngroups, dstate = B.shape[2:]
    if ngroups == 0 or dstate == 0:
        raise ValueError(f"B must have ngroups >= 1 and dstate >= 1, got shape {tuple(B.shape)}")
    checks.divisible("nheads", nheads, "ngroups", ngroups)
    checks.tensor("C", C)
    checks.shape("C", C, [("batch", batch), ("seqlen", seqlen), ("ngroups", ngroups), ("dstate", dstate)])
    checks.tensor("dt", dt)
    checks.shape("dt", dt, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads)])
    checks.tensor("A", A)
    checks.shape("A", A, [("nheads", nheads)])
    for name, value in (("dt", dt), ("A", A), ("B", B), ("C", C)):
        checks.floating(name, value)
    # x, B, C and z share one dtype (they come out of the same projection); dt, A, D, dt_bias and
    # initial_states may be any float dtype (parameters are often kept in fp32).
    checks.same_dtype("x", x, B=B, C=C)

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")

    if D is not None:
        checks.tensor("D", D)
        if tuple(D.shape) not in ((nheads,), (nheads, headdim)):
            raise ValueError(
                f"D must have shape (nheads) = ({nheads},) or (nheads, headdim) = ({nheads}, {headdim}), "
                f"got {tuple(D.shape)}"
            )
        checks.floating("D", D)
    if z is not None:
        checks.tensor("z", z)
        checks.shape("z", z, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads), ("headdim", headdim)])
        checks.same_dtype("x", x, z=z)
    if dt_bias is not None:
        checks.tensor("dt_bias", dt_bias)
        checks.shape("dt_bias", dt_bias, [("nheads", nheads)])
        checks.floating("dt_bias", dt_bias)

    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise ValueError(f"dt_limit must be a pair (min, max), got {dt_limit!r}")
    lower, upper = dt_limit
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (lower, upper)):
        raise TypeError(f"dt_limit must hold two numbers, got {dt_limit!r}")
    if math.isnan(lower) or math.isnan(upper) or lower > upper:
        raise ValueError(f"dt_limit must satisfy min <= max, got {dt_limit!r}")

    if seq_idx is not None:
        checks.tensor("seq_idx", seq_idx)
        checks.shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
        checks.integer("seq_idx", seq_idx)
    num_seqs = None
    if cu_seqlens is not None:
        checks.tensor("cu_seqlens", cu_seqlens)
        checks.same_device("x", x, cu_seqlens=cu_seqlens)
        checks.cu_seqlens("cu_seqlens", cu_seqlens, seqlen, batch)
        num_seqs = cu_seqlens.numel() - 1
    elif return_varlen_states:
        raise ValueError("return_varlen_states=True needs cu_seqlens (the sequence boundaries), got None")

    if initial_states is not None:
        checks.tensor("initial_states", initial_states)
        rows = ("num_seqs", num_seqs) if num_seqs is not None else ("batch", batch)
        dims = [rows, ("nheads", nheads), ("headdim", headdim), ("dstate", dstate)]
        checks.shape("initial_states", initial_states, dims)
        checks.floating("initial_states", initial_states)

    others = dict(dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    checks.same_device("x", x, **others, seq_idx=seq_idx)

    # Value checks last: they read tensor contents (a device sync on GPUs).
    if seq_idx is not None and seqlen > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along seqlen (it numbers the packed sequences)")
    if cu_seqlens is None:
        return None if seq_idx is None else seq_idx.to(torch.int32)
    derived = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)
    if seq_idx is None:
        return derived
    # Both given: they must put the restarts at the same positions.
    if not torch.equal(seq_idx[:, 1:] != seq_idx[:, :-1], derived[:, 1:] != derived[:, :-1]):
        raise ValueError(
            "seq_idx and cu_seqlens disagree on where sequences start: pass one of them, or both "
            f"with the same boundaries (cu_seqlens = {cu_seqlens.tolist()})"
        )
    # The derived ids, not the caller's labels: backends index per-sequence initial states by them.
    return derived
