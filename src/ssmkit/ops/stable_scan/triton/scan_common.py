"""Pieces shared by the forward and backward kernels of the stable state scan: the small matrix
product and one update step (transition, input, LayerNorm over the state axis)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def matmul(a, b, USE_DOT: tl.constexpr):
    """a (M, K) @ b (K, N) in full precision. fp32: ``tl.dot`` with IEEE inputs (no TF32; every
    dimension is padded to >= 16). fp64: a broadcast product summed over K, since ``tl.dot`` has
    no fp64 form on every target."""
    if USE_DOT:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


@triton.jit
def update(hp, dt, x, B, AT, weight, bias, eps, mask_n, d_state, USE_DOT: tl.constexpr):
    """One step for a (BLOCK_D, BLOCK_N) tile of states.

    hp: h_{t-1} after the reset (BLOCK_D, BLOCK_N)   dt, x: (BLOCK_D,)   B, weight, bias: (BLOCK_N,)
    AT: A transposed (BLOCK_N, BLOCK_N), zero-padded.
    ``z = hp + dt (A hp) + dt x B``, ``h = LayerNorm(z) * weight + bias`` over the state axis.
    Returns h, the normalised z (zero in padded state columns) and 1/std per row (BLOCK_D,).
    Padded state columns of z are zero because hp, AT and B are zero there.
    """
    z = hp + dt[:, None] * matmul(hp, AT, USE_DOT) + (dt * x)[:, None] * B[None, :]
    mean = tl.sum(z, axis=1) / d_state
    centred = tl.where(mask_n[None, :], z - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / d_state
    if var.dtype == tl.float32:
        rstd = 1.0 / tl.sqrt_rn(var + eps)  # IEEE-rounded: tl.sqrt may be approximate in fp32
    else:
        rstd = 1.0 / tl.sqrt(var + eps)
    zhat = centred * rstd[:, None]
    h = zhat * weight[None, :] + bias[None, :]
    return h, zhat, rstd


@triton.jit
def keep_state(seq_idx_ptr, stride_seq_l, t, HAS_SEQ_IDX: tl.constexpr):
    """1 when step t continues the sequence of step t - 1 (always at t = 0), else 0."""
    if HAS_SEQ_IDX:
        current = tl.load(seq_idx_ptr + t * stride_seq_l)
        previous = tl.load(seq_idx_ptr + tl.maximum(t - 1, 0) * stride_seq_l)
        keep = current == previous
    else:
        keep = t >= 0
    return keep
