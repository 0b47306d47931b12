"""Triton kernel for one Mamba-2 decode step: update the SSM state in place and read out y.

One program owns a (BLOCK_P, dstate) tile of one head's state for one batch row. The step is
memory bound (every state element is read once and written once, a few flops each), so the kernel
keeps the state tile in registers, loads every per-head quantity once per program, and never
synchronises with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _log1p(u):
    # log(1 + u) without losing the digits of a small u (Kahan's trick): the rounding error made in
    # forming 1 + u cancels in the ratio. softplus of a very negative dt is exactly this case.
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _softplus(dt):
    # Same threshold as torch.nn.functional.softplus: above 20, softplus(dt) == dt in fp32.
    return tl.where(dt <= 20.0, _log1p(tl.exp(tl.minimum(dt, 20.0))), dt)


@triton.jit
def _state_update_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    dt_bias_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    out_ptr,
    indices_ptr,
    headdim,
    dstate,
    heads_per_group,
    stride_state_row,
    stride_state_h,
    stride_state_p,
    stride_state_n,
    stride_x_b,
    stride_x_h,
    stride_x_p,
    stride_dt_b,
    stride_dt_h,
    stride_dt_p,
    stride_dt_bias_h,
    stride_dt_bias_p,
    stride_A_h,
    stride_A_p,
    stride_A_n,
    stride_B_b,
    stride_B_g,
    stride_B_n,
    stride_C_b,
    stride_C_g,
    stride_C_n,
    stride_D_h,
    stride_D_p,
    stride_z_b,
    stride_z_h,
    stride_z_p,
    stride_out_b,
    stride_out_h,
    stride_out_p,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    DT_PER_HEAD: tl.constexpr,
    A_PER_HEAD: tl.constexpr,
    D_PER_HEAD: tl.constexpr,
    A_IS_LOG: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    head = tl.program_id(1)
    batch_row = tl.program_id(2).to(tl.int64)
    group = head // heads_per_group

    if HAS_INDICES:
        state_row = tl.load(indices_ptr + batch_row).to(tl.int64)
    else:
        state_row = batch_row

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_pn = mask_p[:, None] & mask_n[None, :]

    state_ptrs = (
        state_ptr
        + state_row * stride_state_row
        + head * stride_state_h
        + offs_p[:, None] * stride_state_p
        + offs_n[None, :] * stride_state_n
    )
    state = tl.load(state_ptrs, mask=mask_pn, other=0.0).to(COMPUTE_DTYPE)

    x = tl.load(
        x_ptr + batch_row * stride_x_b + head * stride_x_h + offs_p * stride_x_p, mask=mask_p, other=0.0
    ).to(COMPUTE_DTYPE)

    # dt, A and D are usually per-head values broadcast with stride 0 along headdim (and dstate):
    # load them once as scalars instead of gathering the same address BLOCK_P * dstate times.
    dt_base = dt_ptr + batch_row * stride_dt_b + head * stride_dt_h
    if DT_PER_HEAD:
        dt = tl.load(dt_base).to(COMPUTE_DTYPE)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + head * stride_dt_bias_h).to(COMPUTE_DTYPE)
    else:
        dt = tl.load(dt_base + offs_p * stride_dt_p, mask=mask_p, other=0.0).to(COMPUTE_DTYPE)
        if HAS_DT_BIAS:
            dt += tl.load(
                dt_bias_ptr + head * stride_dt_bias_h + offs_p * stride_dt_bias_p, mask=mask_p, other=0.0
            ).to(COMPUTE_DTYPE)
    if DT_SOFTPLUS:
        dt = _softplus(dt)

    if A_PER_HEAD:
        A = tl.load(A_ptr + head * stride_A_h).to(COMPUTE_DTYPE)
        if A_IS_LOG:
            A = -tl.exp(A)
        if DT_PER_HEAD:
            decay = tl.exp(dt * A)  # one scalar for the whole tile
        else:
            decay = tl.exp(dt * A)[:, None]
    else:
        A = tl.load(
            A_ptr + head * stride_A_h + offs_p[:, None] * stride_A_p + offs_n[None, :] * stride_A_n,
            mask=mask_pn,
            other=0.0,
        ).to(COMPUTE_DTYPE)
        if A_IS_LOG:
            A = -tl.exp(A)
        if DT_PER_HEAD:
            decay = tl.exp(A * dt)
        else:
            decay = tl.exp(A * dt[:, None])

    B = tl.load(
        B_ptr + batch_row * stride_B_b + group * stride_B_g + offs_n * stride_B_n, mask=mask_n, other=0.0
    ).to(COMPUTE_DTYPE)
    C = tl.load(
        C_ptr + batch_row * stride_C_b + group * stride_C_g + offs_n * stride_C_n, mask=mask_n, other=0.0
    ).to(COMPUTE_DTYPE)

    dt_x = dt * x  # (BLOCK_P,) whether dt is a scalar or a vector
    state = state * decay + dt_x[:, None] * B[None, :]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask_pn)

    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        if D_PER_HEAD:
            D = tl.load(D_ptr + head * stride_D_h).to(COMPUTE_DTYPE)
        else:
            D = tl.load(D_ptr + head * stride_D_h + offs_p * stride_D_p, mask=mask_p, other=0.0).to(
                COMPUTE_DTYPE
            )
        y += D * x
    if HAS_Z:
        z = tl.load(
            z_ptr + batch_row * stride_z_b + head * stride_z_h + offs_p * stride_z_p, mask=mask_p, other=0.0
        ).to(COMPUTE_DTYPE)
        y *= z * tl.sigmoid(z)
    tl.store(
        out_ptr + batch_row * stride_out_b + head * stride_out_h + offs_p * stride_out_p,
        y.to(out_ptr.dtype.element_ty),
        mask=mask_p,
    )


def _config(device: torch.device, headdim: int, dstate: int, batch: int, nheads: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps). The state tile is BLOCK_P * next_pow2(dstate) elements; it is chosen so
    each thread holds 4 to 16 state values (enough bytes in flight per thread to saturate HBM)
    while keeping at least a few waves of programs when the batch is small."""
    block_n = triton.next_power_of_2(dstate)
    if device.type != "cuda":
        # The CPU interpreter runs one program at a time: big tiles mean fewer Python iterations.
        return min(triton.next_power_of_2(headdim), max(1, 4096 // block_n)), 4
    # Swept on an H100 (h=80, p=64, n=128, fp32 state, CUDA graph): 2 warps were best or within 3 %
    # everywhere; 512-value tiles won at batch 1 (3.06 us, more programs in flight) and 1024-value
    # tiles at batch 128 (231 us, 2.9 TB/s). sm80 gets the same choice (not measured).
    small = batch * nheads * headdim * block_n < (1 << 24)
    block_p = max(1, min(triton.next_power_of_2(headdim), (512 if small else 1024) // block_n))
    num_warps = 2 if block_p * block_n >= 256 else 1
    return block_p, num_warps


def _compute_dtype(*tensors: torch.Tensor) -> tl.dtype:
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _is_per_head(t: torch.Tensor) -> bool:
    """True when every dimension after the head dimension has stride 0 (or size 1)."""
    return all(stride == 0 or size == 1 for size, stride in zip(t.shape[1:], t.stride()[1:]))


def state_update(
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
    out: torch.Tensor,
    config: tuple[int, int] | None = None,
    A_is_log: bool = False,
) -> None:
    """Launch the decode-step kernel; writes ``state`` in place and ``out``.

    state: (pool, nheads, headdim, dstate)   x, dt, z, out: (batch, nheads, headdim)
    A: (nheads, headdim, dstate)   B, C: (batch, ngroups, dstate)   D, dt_bias: (nheads, headdim)
    state_batch_indices: (batch,) int rows of ``state`` to update (None: row i for batch i).
    Any strides are accepted, including stride 0 for per-head broadcasts.
    A_is_log: A holds A_log; the kernel uses A = -exp(A_log) (no separate launch for it per step).
    config: (BLOCK_P, num_warps) to override the built-in choice (benchmark sweeps only).
    """
    batch, nheads, headdim = x.shape
    dstate = state.shape[-1]
    ngroups = B.shape[1]
    # dt is per head only when dt_bias is too (or absent): the sum must be constant along headdim.
    dt_per_head = dt.stride(2) == 0 and (dt_bias is None or _is_per_head(dt_bias))
    a_per_head = _is_per_head(A)
    d_per_head = D is not None and _is_per_head(D)
    block_p, num_warps = config or _config(state.device, headdim, dstate, batch, nheads)
    block_n = triton.next_power_of_2(dstate)

    def strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
        return tuple(t.stride()) if t is not None else (0,) * ndim

    grid = (triton.cdiv(headdim, block_p), nheads, batch)
    _state_update_kernel[grid](
        state,
        x,
        dt,
        dt_bias,
        A,
        B,
        C,
        D,
        z,
        out,
        state_batch_indices,
        headdim,
        dstate,
        nheads // ngroups,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *strides(dt_bias, 2),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        *strides(D, 2),
        *strides(z, 3),
        *out.stride(),
        HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=dt_softplus,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_INDICES=state_batch_indices is not None,
        DT_PER_HEAD=dt_per_head,
        A_PER_HEAD=a_per_head,
        D_PER_HEAD=d_per_head,
        A_IS_LOG=A_is_log,
        COMPUTE_DTYPE=_compute_dtype(state, x),
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
