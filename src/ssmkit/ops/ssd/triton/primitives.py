"""Pieces shared by the stage kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tl.dot must get fp32 operands: Triton's CPU interpreter computes bf16 dots wrongly
    (it reads the bf16 bits as another type; seen with triton 3.9), so there bf16 operands are
    widened. On GPUs the dots run in the input dtype with fp32 accumulation."""
    return device.type != "cuda" and dtype == torch.bfloat16


@triton.jit
def mma(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; fp32 operands use IEEE fp32 (never TF32) so that fp32 inputs
    keep fp32 accuracy."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")
