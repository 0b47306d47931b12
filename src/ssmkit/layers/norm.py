"""RMSNorm module over :func:`ssmkit.ops.rms_norm`."""

from __future__ import annotations

import torch
from torch import nn

from ssmkit import ops


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 for half-precision inputs.

    x: (..., d) -> y: (..., d) in the dtype of x.
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Gated RMSNorm over groups of ``group_size`` channels (Mamba-2's output norm).

    norm_before_gate=False: y = rmsnorm(x * silu(z)) * weight (Hugging Face's and mamba_ssm's
    Mamba-2 default); True: y = rmsnorm(x) * weight * silu(z).
    x, z: (..., d) -> y: (..., d) in the dtype of x.
    """

    def __init__(
        self, d: int, *, group_size: int | None = None, eps: float = 1e-5, norm_before_gate: bool = False
    ) -> None:
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.group_size = group_size if group_size is not None else d
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return ops.rms_norm_gated(
            x,
            self.weight,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"
