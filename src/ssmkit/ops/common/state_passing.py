"""Passing states between chunks: ``H_c = decay_c * H_{c-1} + S_c``."""

from __future__ import annotations

import torch


class _StatePassing(torch.autograd.Function):
    """The recurrence over chunks with its gradient written out.

    Plain autograd through the loop would keep every intermediate state alive in its own
    allocation and then copy them all once more into the stacked result; on CPUs that doubles the
    memory traffic of the whole SSD forward. Here the states are written once, into the output.
    Backward runs the same recurrence in reverse: dH_{c-1} = dEntering_c + decay_c * dH_c.
    """

    @staticmethod
    def forward(ctx, chunk_states, decay, initial_state):
        nchunks = chunk_states.shape[1]
        entering = torch.empty_like(chunk_states)
        final = torch.empty_like(chunk_states[:, 0])
        if initial_state is None:
            entering[:, 0].zero_()
        else:
            entering[:, 0].copy_(initial_state)
        for c in range(nchunks):
            nxt = entering[:, c + 1] if c + 1 < nchunks else final
            torch.addcmul(chunk_states[:, c], decay[:, c], entering[:, c], out=nxt)
        ctx.save_for_backward(decay, entering)
        ctx.has_initial_state = initial_state is not None
        return entering, final

    @staticmethod
    def backward(ctx, grad_entering, grad_final):
        decay, entering = ctx.saved_tensors
        nchunks = entering.shape[1]
        if grad_entering is None:
            grad_entering = torch.zeros_like(entering)
        # grad_states[:, c] is dL/dH_c, the gradient of the state after chunk c.
        grad_states = torch.empty_like(entering)
        if grad_final is None:
            grad_states[:, -1].zero_()
        else:
            grad_states[:, -1].copy_(grad_final)
        for c in range(nchunks - 1, 0, -1):
            torch.addcmul(grad_entering[:, c], decay[:, c], grad_states[:, c], out=grad_states[:, c - 1])
        grad_initial = None
        if ctx.has_initial_state and ctx.needs_input_grad[2]:
            grad_initial = grad_entering[:, 0] + decay[:, 0] * grad_states[:, 0]
        grad_decay = None
        if ctx.needs_input_grad[1]:
            # dL/ddecay_c = <dH_c, H_{c-1}>, summed over the state dims (kept as size-1 dims).
            dims = tuple(range(3, entering.dim()))
            grad_decay = (grad_states * entering).sum(dim=dims, keepdim=True)
        return grad_states, grad_decay, grad_initial


def state_passing(
    chunk_states: torch.Tensor,
    chunk_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn per-chunk states into the states entering each chunk.

    chunk_states: (batch, nchunks, nheads, *state), the state each chunk builds from zero.
    chunk_decay: (batch, nchunks, nheads), ``exp(sum of dA over the chunk)``.
    initial_state: (batch, nheads, *state), the state before chunk 0 (zeros when None).
    keep: (batch, nchunks) bool, False where the state must not flow into chunk c (a sequence
    boundary inside or at the start of it); None keeps everything.
    Returns ``(entering, final)``: entering (batch, nchunks, nheads, *state) is the state before
    each chunk, final (batch, nheads, *state) the state after the last chunk.

    A loop over chunks (not time steps): nchunks is seqlen / chunk_size, and each step is one
    fused multiply-add over (batch, nheads, *state), cheaper than the (nchunks x nchunks) matrix
    form once there are more than a handful of chunks.
    """
    batch, nchunks, nheads = chunk_states.shape[:3]
    decay = chunk_decay.to(chunk_states.dtype)
    if keep is not None:
        decay = decay * keep[:, :, None].to(decay.dtype)
    decay = decay.reshape(batch, nchunks, nheads, *(1,) * (chunk_states.dim() - 3))
    if initial_state is not None:
        initial_state = initial_state.to(chunk_states.dtype)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the out= writes into strided slices; the functional loop is the same
        # recurrence, and the compiler fuses it.
        return _state_passing_functional(chunk_states, decay, initial_state)
    return _StatePassing.apply(chunk_states, decay, initial_state)


def _state_passing_functional(
    chunk_states: torch.Tensor, decay: torch.Tensor, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    state = torch.zeros_like(chunk_states[:, 0]) if initial_state is None else initial_state
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = chunk_states[:, c] + decay[:, c] * state
    return torch.stack(entering, dim=1), state
