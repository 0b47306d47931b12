"""Building blocks shared by the forward and backward kernels: softplus, the in-block scans, and
picking one state index out of a (BLOCK_D, BLOCK_N) tile.

Both scans run along the time axis (axis 1) of a (BLOCK_D, BLOCK_L) tile, one state index at a
time. On a GPU they are ``tl.associative_scan``s: each thread scans its few consecutive time steps
in registers, then warps combine their totals. ``PRODUCT_FORM`` (CPU interpreter only) writes them
as products with a (BLOCK_L, BLOCK_L) matrix of segment decays instead, O(BLOCK_L^2) work but a
handful of whole-tile numpy operations, because Triton's interpreter runs an associative scan with
a user combine element by element in Python (about 100x slower), which would put the kernels out
of reach of CI. The interpreter uses short blocks (8 steps) for it. A test runs the
associative-scan path under the interpreter too, at a tiny size.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    # Same threshold as torch.nn.functional.softplus; log(1 + exp(-|x|)) avoids overflow.
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def affine_combine(decay_left, value_left, decay_right, value_right):
    # Composition of two steps h -> decay * h + value, the left (earlier) one applied first.
    return decay_left * decay_right, value_left * decay_right + value_right


@triton.jit
def adjoint_combine(first_later, tail_later, sum_later, first_earlier, tail_earlier, sum_earlier):
    # Reverse-scan combine: with reverse=True Triton passes the accumulated later segment [m+1..s]
    # first and the earlier one [t..m] second (the flip(scan(flip(x))) convention, as in jax).
    # A segment [t..s] carries its first decay a_t, tail = prod_{r=t+1..s} a_r and
    # sum = sum_{k=t..s} (prod_{r=t+1..k} a_r) x_k, the adjoint at t of the inputs x in the segment.
    # Keeping a_t apart is what lets the adjoint use a_{t+1} without shifting the tile by one step.
    bridge = tail_earlier * first_later
    return first_earlier, bridge * tail_later, sum_earlier + bridge * sum_later


@triton.jit
def column(tile, offs_n, n):
    """tile[:, n] of a (BLOCK_D, BLOCK_N) tile, as a (BLOCK_D,) vector."""
    return tl.sum(tl.where(offs_n[None, :] == n, tile, 0.0), axis=1)


@triton.jit
def _segment_decays(log_decay):
    """W[d, t, k] = prod_{r=k+1..t} exp(log_decay[d, r]) for k <= t, else 0: (BLOCK_D, BLOCK_L, BLOCK_L).

    Each exponent is summed from its own terms (no difference of cumulative sums), so nothing
    overflows or cancels however large the decays."""
    time = tl.arange(0, log_decay.shape[1])
    t = time[:, None, None]
    k = time[None, :, None]
    r = time[None, None, :]
    inside = ((k < r) & (r <= t)).to(log_decay.dtype)
    exponent = tl.sum(log_decay[:, None, None, :] * inside[None, :, :, :], axis=3)
    return tl.where((time[None, :, None] >= time[None, None, :]), tl.exp(exponent), 0.0)


@triton.jit
def forward_states(log_decay, decay, value, state0, PRODUCT_FORM: tl.constexpr):
    """States h_t = decay_t * h_{t-1} + value_t of one block, from h before the block.

    log_decay, decay (its exp), value: (BLOCK_D, BLOCK_L)   state0: (BLOCK_D,)
    returns (BLOCK_D, BLOCK_L)
    """
    if PRODUCT_FORM:
        weights = _segment_decays(log_decay)
        from_start = tl.exp(tl.cumsum(log_decay, axis=1))
        states = tl.sum(weights * value[:, None, :], axis=2) + from_start * state0[:, None]
    else:
        decay_prefix, value_prefix = tl.associative_scan((decay, value), 1, affine_combine)
        states = value_prefix + decay_prefix * state0[:, None]
    return states


@triton.jit
def adjoint_states(log_decay, decay, adjoint_input, carry, PRODUCT_FORM: tl.constexpr):
    """Adjoint g_t = x_t + decay_{t+1} * g_{t+1} over one block, walking time backwards.

    log_decay, decay (its exp), adjoint_input (x): (BLOCK_D, BLOCK_L)
    carry: (BLOCK_D,), decay_{end+1} * g_{end+1}, what later blocks send into the block's last step.
    """
    if PRODUCT_FORM:
        # g_t = sum_{k>=t} W[k, t] x_k + W[end, t] carry.
        weights = _segment_decays(log_decay)
        last = (tl.arange(0, log_decay.shape[1]) == log_decay.shape[1] - 1)[None, :, None]
        tail = tl.sum(tl.where(last, weights, 0.0), axis=1)
        adjoint = tl.sum(weights * adjoint_input[:, :, None], axis=1) + tail * carry[:, None]
    else:
        _, tail, adjoint_sum = tl.associative_scan(
            (decay, adjoint_input * 0.0 + 1.0, adjoint_input), 1, adjoint_combine, reverse=True
        )
        adjoint = adjoint_sum + tail * carry[:, None]
    return adjoint
