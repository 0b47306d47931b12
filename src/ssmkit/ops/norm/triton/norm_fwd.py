"""Forward kernel of the gated, grouped RMSNorm.

One program normalises a (BLOCK_M rows, group_size channels) tile: the whole group sits in registers,
so x and z are read once and out written once (the bandwidth floor). Several rows per program keep
the tiles large when groups are small (group_size 64 to 256 in Mamba-2 with ngroups > 1).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# A group must fit in one tile; 32768 fp32 values are 128 KiB of registers per program (16 warps).
MAX_GROUP_SIZE = 32768


@triton.jit
def _rms_norm_gated_fwd_kernel(
    x_ptr,
    z_ptr,
    weight_ptr,
    out_ptr,
    rstd_ptr,
    rows,
    group_size,
    eps,
    stride_x_row,
    stride_x_col,
    stride_z_row,
    stride_z_col,
    stride_out_row,
    stride_rstd_row,
    HAS_Z: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    group = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    cols = group * group_size + offs_n
    mask_m = offs_m < rows
    mask_n = offs_n < group_size
    mask = mask_m[:, None] & mask_n[None, :]

    x = tl.load(x_ptr + offs_m[:, None] * stride_x_row + cols[None, :] * stride_x_col, mask=mask, other=0.0)
    x = x.to(COMPUTE_DTYPE)
    if HAS_Z:
        z = tl.load(
            z_ptr + offs_m[:, None] * stride_z_row + cols[None, :] * stride_z_col, mask=mask, other=0.0
        )
        z = z.to(COMPUTE_DTYPE)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x = x * gate
    # Masked columns hold zeros, so the sum over the padded tile is the sum over the group.
    mean_square = tl.sum(x * x, axis=1) / group_size
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    tl.store(rstd_ptr + offs_m * stride_rstd_row + group, rstd, mask=mask_m)

    weight = tl.load(weight_ptr + cols, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
    out = x * rstd[:, None] * weight[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        out = out * gate
    tl.store(
        out_ptr + offs_m[:, None] * stride_out_row + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@functools.cache
def fwd_config(is_cuda: bool, rows: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about 4096 values per tile (16 per thread with 8 warps), or one
    row when a group alone is larger."""
    block_n = triton.next_power_of_2(group_size)
    if not is_cuda:
        # The CPU interpreter pays per program, not per element: take many rows at once.
        return min(triton.next_power_of_2(rows), max(1, 16384 // block_n)), block_n, 4
    block_m = min(triton.next_power_of_2(rows), max(1, 4096 // block_n))
    num_warps = min(16, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


def compute_dtype(*tensors: torch.Tensor | None) -> tl.dtype:
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def rms_norm_gated_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
    out: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """Launch the forward kernel.

    x, z: (rows, dim) any strides   weight: (dim,) contiguous   out: (rows, dim) contiguous rows
    rstd: (rows, dim // group_size) written with 1 / sqrt(mean(u^2) + eps) per row and group, in the
    compute dtype (fp32, or fp64 for fp64 inputs); u is x, or x * silu(z) when the gate comes first.
    """
    rows, dim = x.shape
    ngroups = dim // group_size
    block_m, block_n, num_warps = fwd_config(x.device.type == "cuda", rows, group_size)
    grid = (triton.cdiv(rows, block_m), ngroups)
    z_strides = z.stride() if z is not None else (0, 0)
    _rms_norm_gated_fwd_kernel[grid](
        x,
        z,
        weight,
        out,
        rstd,
        rows,
        group_size,
        eps,
        *x.stride(),
        *z_strides,
        out.stride(0),
        rstd.stride(0),
        HAS_Z=z is not None,
        NORM_BEFORE_GATE=norm_before_gate,
        COMPUTE_DTYPE=compute_dtype(x, weight, z),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
