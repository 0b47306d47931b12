"""``selective_scan_fn``: the public Mamba-1 selective scan (checks, B/C normalisation, dispatch).

Backends share one canonical signature and return pair, so they are interchangeable:

    fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
       cu_seqlens) -> (out, last_state or None)

with B and C already in the grouped form (batch, ngroups, dstate, seqlen) and every argument
checked. ``"reference"`` is :func:`~ssmkit.ops.selective_scan.reference.selective_scan_reference`
(one step per position), ``"torch"`` is
:func:`~ssmkit.ops.selective_scan.chunked.selective_scan_chunked` (chunked, the CPU fast path,
with its own backward); ``"triton"`` is ``selective_scan_triton`` from
``ssmkit.ops.selective_scan.triton``, imported only when that backend runs, with its own backward.
"""

from __future__ import annotations

import torch

from ssmkit.ops import checks
from ssmkit.ops.dispatch import resolve
from ssmkit.ops.selective_scan.chunked import selective_scan_chunked
from ssmkit.ops.selective_scan.reference import selective_scan_reference

_OP_PACKAGE = "ssmkit.ops.selective_scan"


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan, compatible with ``mamba_ssm``'s function of the same name.

    u, delta: (batch, dim, seqlen)   A: (dim, dstate), real
    B, C: (batch, dstate, seqlen), or grouped (batch, ngroups, dstate, seqlen) with dim divisible
    by ngroups; channel d reads group d // (dim // ngroups). B and C take the same form.
    D, delta_bias: (dim,)   z: (batch, dim, seqlen)
    initial_state: (batch, dim, dstate); with cu_seqlens (num_seqs, dim, dstate), one per sequence
    cu_seqlens: (num_seqs + 1,) int32/int64 boundaries of sequences packed into batch 1
    (flash-attn convention): the state restarts at each boundary, so a packed batch gives what
    the sequences give one by one
    backend: "auto" | "reference" | "torch" | "triton", or None for the one in force
    (see :mod:`ssmkit.ops.dispatch`)

    For every channel d and state index n::

        delta_t = softplus(delta_t + delta_bias)        (bias and softplus optional)
        h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
        y_t     = sum_n C_t * h_t + D * u_t
        out_t   = y_t * silu(z_t)                       (if z is given)

    Returns out: (batch, dim, seqlen) in the dtype of u; with return_last_state, also the state
    after the last position, (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens
    (an empty sequence's is its initial state). Like ``mamba_ssm`` the state is kept in the
    compute dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs. It can be passed back
    as ``initial_state`` to continue the sequences. Arithmetic runs in that compute dtype too.
    Differentiable in every floating tensor argument, through out and last_state alike.
    """
    u = checks.tensor("u", u)
    delta = checks.tensor("delta", delta)
    A = checks.tensor("A", A)
    B = checks.tensor("B", B)
    C = checks.tensor("C", C)
    D = checks.tensor("D", D, optional=True)
    z = checks.tensor("z", z, optional=True)
    delta_bias = checks.tensor("delta_bias", delta_bias, optional=True)
    initial_state = checks.tensor("initial_state", initial_state, optional=True)
    cu_seqlens = checks.tensor("cu_seqlens", cu_seqlens, optional=True)

    checks.shape("u", u, [("batch", None), ("dim", None), ("seqlen", None)])
    batch, dim, seqlen = u.shape
    checks.shape("delta", delta, [("batch", batch), ("dim", dim), ("seqlen", seqlen)])
    checks.shape("A", A, [("dim", dim), ("dstate", None)])
    dstate = A.shape[1]
    B = _grouped("B", B, batch, dstate, seqlen)
    ngroups = B.shape[1]
    C = _grouped("C", C, batch, dstate, seqlen, ngroups)
    checks.divisible("dim", dim, "ngroups", ngroups)
    if D is not None:
        checks.shape("D", D, [("dim", dim)])
    if z is not None:
        checks.shape("z", z, [("batch", batch), ("dim", dim), ("seqlen", seqlen)])
    if delta_bias is not None:
        checks.shape("delta_bias", delta_bias, [("dim", dim)])

    others = dict(delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    for name, value in [("u", u), *others.items()]:
        if value is not None:
            checks.floating(name, value)
    # As in mamba_ssm: the activations share one dtype; A, B, C, D, delta_bias and the state may
    # be in another (typically fp32 weights with bf16 activations).
    checks.same_dtype("u", u, delta=delta, z=z)
    checks.same_device("u", u, **others, cu_seqlens=cu_seqlens)

    if cu_seqlens is not None:
        checks.cu_seqlens("cu_seqlens", cu_seqlens, seqlen, batch)
        num_states = cu_seqlens.shape[0] - 1
        state_dims = [("num_seqs", num_states), ("dim", dim), ("dstate", dstate)]
    else:
        state_dims = [("batch", batch), ("dim", dim), ("dstate", dstate)]
    if initial_state is not None:
        checks.shape("initial_state", initial_state, state_dims)

    implementation = resolve(_OP_PACKAGE, backend, u.device)
    if implementation == "triton":
        from ssmkit.ops.selective_scan.triton import selective_scan_triton as scan
    elif implementation == "reference":
        scan = selective_scan_reference
    else:
        scan = selective_scan_chunked
    flags = (bool(delta_softplus), bool(return_last_state))
    with torch.autocast(u.device.type, enabled=False):  # the operator picks its own precision
        out, last_state = scan(u, delta, A, B, C, D, z, delta_bias, *flags, initial_state, cu_seqlens)
    return (out, last_state) if return_last_state else out


def _grouped(
    name: str, value: torch.Tensor, batch: int, dstate: int, seqlen: int, ngroups: int | None = None
) -> torch.Tensor:
    """Check B or C and return it as (batch, ngroups, dstate, seqlen) (a view: (batch, dstate,
    seqlen) is the single-group case). ``ngroups`` given: C must match B's group count."""
    if value.dim() == 3 and ngroups in (None, 1):
        checks.shape(name, value, [("batch", batch), ("dstate", dstate), ("seqlen", seqlen)])
        return value.unsqueeze(1)
    if value.dim() == 4:
        dims = [("batch", batch), ("ngroups", ngroups), ("dstate", dstate), ("seqlen", seqlen)]
        checks.shape(name, value, dims)
        return value
    if ngroups is None:
        raise ValueError(
            f"{name} must have shape (batch, dstate, seqlen) = ({batch}, {dstate}, {seqlen}) or "
            f"(batch, ngroups, dstate, seqlen) = ({batch}, ?, {dstate}, {seqlen}), got {tuple(value.shape)}"
        )
    raise ValueError(
        f"{name} must have shape (batch, ngroups, dstate, seqlen) = ({batch}, {ngroups}, {dstate}, {seqlen}) "
        f"like B, got {tuple(value.shape)}"
    )
