"""Gated MLP (SwiGLU) and a top-k mixture of gated-MLP experts.

Weight layouts follow the checkpoints we read: ``fc1`` holds the gate rows first and the value
rows second (Granite's ``input_linear``, mamba_ssm's ``GatedMLP.fc1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.tracing import record


class GatedMLP(nn.Module):
    """y = fc2(silu(gate) * value) with [gate, value] = fc1(x).

    x: (..., d_model) -> y: (..., d_model)
    """

    def __init__(self, d_model: int, d_intermediate: int, *, bias: bool = False) -> None:
        super().__init__()
        self.d_intermediate = d_intermediate
        self.fc1 = nn.Linear(d_model, 2 * d_intermediate, bias=bias)
        self.fc2 = nn.Linear(d_intermediate, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class MixtureOfExperts(nn.Module):
    """Top-k routed gated-MLP experts; the k routing weights are a softmax over the k best logits.

    x: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model)
    Parameters: router (num_experts, d_model); fc1 (num_experts, 2 * d_expert, d_model) with gate
    rows first; fc2 (num_experts, d_model, d_expert).
    """

    def __init__(self, d_model: int, d_expert: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.d_expert = num_experts, top_k, d_expert
        self.router = nn.Parameter(torch.empty(num_experts, d_model))
        self.fc1 = nn.Parameter(torch.empty(num_experts, 2 * d_expert, d_model))
        self.fc2 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        bound = d_model**-0.5
        for p in (self.router, self.fc1):
            nn.init.uniform_(p, -bound, bound)
        nn.init.uniform_(self.fc2, -(d_expert**-0.5), d_expert**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        # Route in fp32 (fp64 stays fp64): near-ties between experts must not flip with bf16 rounding.
        logits = F.linear(tokens, self.router)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        top_weights = torch.softmax(top_logits, dim=-1).to(x.dtype)
        out = torch.zeros_like(tokens)
        # Loop over experts, not tokens: each expert runs one matmul on the tokens routed to it.
        for expert in range(self.num_experts):
            token_idx, slot = torch.where(top_index == expert)
            if token_idx.numel() == 0:
                continue
            gate, value = F.linear(tokens[token_idx], self.fc1[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * value, self.fc2[expert])
            out.index_add_(0, token_idx, y * top_weights[token_idx, slot, None])
        return out.reshape(shape)


class FeedForward(nn.Module):
    """The MLP half of a block: a gated MLP, plus routed experts when configured (Granite-MoE).

    x: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model)
    """

    def __init__(
        self,
        d_model: int,
        d_intermediate: int,
        *,
        bias: bool = False,
        num_experts: int = 0,
        experts_per_token: int = 2,
        expert_intermediate: int = 0,
    ) -> None:
        super().__init__()
        self.shared = GatedMLP(d_model, d_intermediate, bias=bias)
        self.experts = (
            MixtureOfExperts(d_model, expert_intermediate, num_experts, experts_per_token)
            if num_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(x)
        if self.experts is not None:
            y = y + self.experts(x)
        record(self, "mlp", y)
        return y
