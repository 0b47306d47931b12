"""Triton decode step for Mamba-2, registered as the custom op ``ssmkit::selective_state_update``.

The op mutates ``state`` in place, so it is declared with ``mutates_args=("state",)``: torch.compile
then keeps it in the graph without a break, functionalises the write, and CUDA graphs can capture it
(the launcher never reads a tensor value on the host). Decode needs no backward.
"""

from __future__ import annotations

import contextlib

import torch

from ssmkit.ops.common.eager import op_or_impl
from ssmkit.ops.step.triton.state_update import state_update

__all__ = ["selective_state_update_triton"]

_SCHEMA = (
    "(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices, bool A_is_log=False) -> Tensor"
)


@torch.library.custom_op("ssmkit::selective_state_update", mutates_args=("state",), schema=_SCHEMA)
def _selective_state_update_op(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    state_batch_indices: torch.Tensor | None,
    A_is_log: bool = False,
) -> torch.Tensor:
    return _launch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, A_is_log)


def _launch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, A_is_log) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    # Triton launches on the current CUDA device: switch to the tensors' device when it differs.
    other_device = x.device.type == "cuda" and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if other_device else contextlib.nullcontext():
        state_update(
            state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, out, A_is_log=A_is_log
        )
    return out


@_selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, A_is_log=False):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def selective_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    state_batch_indices: torch.Tensor | None,
    A_is_log: bool = False,
) -> torch.Tensor:
    """One Mamba-2 decode step on the GPU (or the Triton CPU interpreter); updates ``state`` in place.

    state: (pool, nheads, headdim, dstate), row ``state_batch_indices[i]`` (or ``i``) is updated
    x, dt, z: (batch, nheads, headdim)   A: (nheads, headdim, dstate)   B, C: (batch, ngroups, dstate)
    D, dt_bias: (nheads, headdim) (stride-0 broadcasts of per-head values are detected and read once)
    state_batch_indices: None or int (batch,)
    A_is_log: A holds A_log and the kernel uses A = -exp(A_log)
    Returns y: (batch, nheads, headdim) in the dtype of x. Arguments are validated by the interface.

    dt <- softplus(dt + dt_bias); state <- exp(dt A) state + dt B x; y <- (C . state + D x) silu(z).
    """
    # Eager decode (the hot path of generation without CUDA graphs): the custom op's dispatch costs
    # more host time than the launch itself; only torch.compile needs to see the op.
    step = op_or_impl(_selective_state_update_op, _launch)
    return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, A_is_log)
