"""Pre-norm residual block: hidden + m * mixer(norm(hidden)), then hidden + m * mlp(norm2(hidden))."""

from __future__ import annotations

import torch
from torch import nn

from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.tracing import record


class Block(nn.Module):
    """One layer of the stack: a mixer (Mamba-1, Mamba-2, attention, S4) and an optional MLP.

    hidden: (batch, seqlen, d_model) -> (batch, seqlen, d_model).
    With ``residual_in_fp32`` the residual stream is kept (and returned) in fp32 whatever the
    parameters' dtype, so that many small branch outputs do not vanish into bf16 rounding; each
    branch still computes in the parameters' dtype. ``residual_multiplier`` scales every branch
    output before it is added (Granite).
    """

    def __init__(
        self,
        d_model: int,
        mixer: nn.Module,
        *,
        mlp: nn.Module | None = None,
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        residual_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model, eps=norm_eps) if mlp is not None else None
        self.mlp = mlp
        self.residual_in_fp32 = residual_in_fp32
        self.residual_multiplier = residual_multiplier

    def _add(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.residual_in_fp32 and residual.dtype != torch.float64:
            residual = residual.float()
        if self.residual_multiplier != 1.0:
            branch = branch * self.residual_multiplier
        return residual + branch

    def forward(self, hidden: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        """mixer_kwargs (seq_idx, cu_seqlens, state, decode) go to the mixer unchanged."""
        dtype = self.norm.weight.dtype
        normed = self.norm(hidden.to(dtype))
        record(self, "in_norm", normed)
        hidden = self._add(hidden, self.mixer(normed, **mixer_kwargs))
        record(self, "residual", hidden)
        if self.mlp is not None:
            normed = self.norm2(hidden.to(dtype))
            record(self, "mlp_norm", normed)
            hidden = self._add(hidden, self.mlp(normed))
            record(self, "mlp_residual", hidden)
        return hidden
