"""Kernel of the pre-norm residual step: residual add and RMSNorm in one pass over the row.

A decode step of a small model is latency bound: the add of a block's output to the residual stream,
the cast of the stream to the parameters' dtype and the next norm are three launches for a few KiB.
Here one program reads the branch output and the residual once, writes the new residual (only when
it is a new tensor) and the normalised row. Every intermediate is rounded where the unfused PyTorch
ops round it (the scaled branch to x's dtype, the sum to the residual's dtype, the norm's input to
the weight's dtype), so the fused and unfused paths differ only in the order of the reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.ops.norm.triton.norm_fwd import compute_dtype, fwd_config


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    rows,
    dim,
    eps,
    multiplier,
    stride_x_row,
    stride_x_col,
    stride_residual_row,
    stride_residual_col,
    stride_out_row,
    stride_residual_out_row,
    HAS_RESIDUAL: tl.constexpr,
    HAS_MULTIPLIER: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < dim
    mask = mask_m[:, None] & mask_n[None, :]

    x = tl.load(x_ptr + offs_m[:, None] * stride_x_row + offs_n[None, :] * stride_x_col, mask=mask, other=0.0)
    if HAS_MULTIPLIER:
        # x * multiplier is a tensor of x's dtype in the unfused path: round it there too.
        x = (x.to(COMPUTE_DTYPE) * multiplier).to(x_ptr.dtype.element_ty)
    total = x.to(COMPUTE_DTYPE)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + offs_m[:, None] * stride_residual_row + offs_n[None, :] * stride_residual_col,
            mask=mask,
            other=0.0,
        )
        total += residual.to(COMPUTE_DTYPE)
    # Without a new residual tensor, the residual is x itself (its dtype is x's).
    total = total.to(residual_out_ptr.dtype.element_ty)
    if STORE_RESIDUAL:
        tl.store(
            residual_out_ptr + offs_m[:, None] * stride_residual_out_row + offs_n[None, :],
            total,
            mask=mask,
        )
    values = total.to(out_ptr.dtype.element_ty).to(COMPUTE_DTYPE)
    # Masked columns hold zeros, so the sum over the padded tile is the sum over the row.
    mean_square = tl.sum(values * values, axis=1) / dim
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    weight = tl.load(weight_ptr + offs_n, mask=mask_n, other=0.0).to(COMPUTE_DTYPE)
    out = values * rstd[:, None] * weight[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_out_row + offs_n[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def add_rms_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    multiplier: float,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
) -> None:
    """Launch the kernel.

    x, residual: (rows, dim) any strides   weight: (dim,) contiguous
    out: (rows, dim) in weight's dtype, contiguous rows
    residual_out: (rows, dim) contiguous rows, written with residual + multiplier * x; None when the
    new residual is x itself (no residual, multiplier 1): then nothing but ``out`` is written.
    """
    rows, dim = x.shape
    block_m, block_n, num_warps = fwd_config(x.device.type == "cuda", rows, dim)
    residual_strides = residual.stride() if residual is not None else (0, 0)
    _add_rms_norm_kernel[(triton.cdiv(rows, block_m),)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        residual_out if residual_out is not None else x,
        rows,
        dim,
        eps,
        multiplier,
        *x.stride(),
        *residual_strides,
        out.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        HAS_RESIDUAL=residual is not None,
        HAS_MULTIPLIER=multiplier != 1.0,
        STORE_RESIDUAL=residual_out is not None,
        COMPUTE_DTYPE=compute_dtype(x, residual, weight, residual_out),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
