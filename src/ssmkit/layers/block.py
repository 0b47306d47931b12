"""Pre-norm residual block: hidden + m * mixer(norm(hidden)), then hidden + m * mlp(norm2(hidden)).

Each residual add that is followed by a norm runs as one ``add_rms_norm`` (a fused kernel on the
Triton backend); :meth:`Block.forward_prenorm` leaves the block's last add to the caller, so a
decode loop over the blocks can fuse it with the next block's norm as well.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.tracing import record
from ssmkit.ops import norm as ops_norm


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
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model, eps=norm_eps) if mlp is not None else None
        self.mlp = mlp
        self.residual_in_fp32 = residual_in_fp32
        self.residual_multiplier = residual_multiplier
        # On each branch before its residual add, in training only (nn.Dropout is the identity
        # in eval mode, so decoding and evaluation are unaffected).
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _residual_dtype(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.dtype:
        """The dtype of residual + branch: fp32 at least with ``residual_in_fp32`` (fp64 stays)."""
        dtype = _promote_types(residual.dtype, branch.dtype)
        if self.residual_in_fp32 and dtype != torch.float64:
            dtype = _promote_types(dtype, torch.float32)
        return dtype

    def add_norm(
        self, norm: RMSNorm, branch: torch.Tensor | None, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + m * branch (residual as it is when branch is None), then ``norm`` of it in the
        norm's dtype; one fused kernel on the Triton backend. Returns (normed, new residual)."""
        if branch is None:
            return ops_norm.add_rms_norm(residual, None, norm.weight, norm.eps)
        normed, residual = ops_norm.add_rms_norm(
            branch,
            residual,
            norm.weight,
            norm.eps,
            multiplier=self.residual_multiplier,
            residual_dtype=self._residual_dtype(residual, branch),
        )
        return normed, residual

    def add(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """residual + m * branch, in fp32 at least with ``residual_in_fp32``."""
        dtype = self._residual_dtype(residual, branch)
        if self.residual_multiplier != 1.0:
            branch = branch * self.residual_multiplier
        return (residual.to(dtype) + branch).to(dtype)

    def forward_prenorm(
        self, branch: torch.Tensor | None, residual: torch.Tensor, **mixer_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block in ``mamba_ssm``'s pre-norm form, which leaves its last residual add to the caller
        so that it can be fused with the next block's norm (one kernel instead of three in decode).

        branch: (batch, seqlen, d_model), the previous block's last branch output not yet added to
        ``residual`` (None: nothing pending, e.g. the embedding as the residual of the first block).
        Returns (this block's last branch output, the residual it is to be added to).
        """
        normed, residual = self.add_norm(self.norm, branch, residual)
        record(self, "in_norm", normed)
        branch = self.mixer(normed, **mixer_kwargs)
        if self.dropout is not None:
            branch = self.dropout(branch)
        if self.mlp is not None:
            normed, residual = self.add_norm(self.norm2, branch, residual)
            record(self, "residual", residual)
            record(self, "mlp_norm", normed)
            branch = self.mlp(normed)
            if self.dropout is not None:
                branch = self.dropout(branch)
        return branch, residual

    def forward(self, hidden: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        """mixer_kwargs (seq_idx, cu_seqlens, state, decode) go to the mixer unchanged."""
        branch, residual = self.forward_prenorm(None, hidden, **mixer_kwargs)
        hidden = self.add(residual, branch)
        record(self, "mlp_residual" if self.mlp is not None else "residual", hidden)
        return hidden


# Cached: torch.promote_types goes through the dispatcher, host time on every decode step.
_promote_types = functools.cache(torch.promote_types)
