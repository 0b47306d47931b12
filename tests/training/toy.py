"""A tiny language model following the ``ssmkit.models`` contract, for fast trainer tests.

forward(input_ids, *, labels=None, cu_seqlens=None) -> object with .logits and .loss. It is a
diagonal linear recurrence written as a masked (seqlen x seqlen) decay matrix, with parameters
named like a Mamba layer's (A_log, D, dt_bias, a norm, an embedding, biases) so that the
optimizer-group rules and recovery tools see the names they look for. ``faults`` injects
failures at given forward calls: "nan" (loss NaN), "inf_grad" (an Inf gradient on proj.weight),
"spike" (loss times 50).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ToyOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None


class ToyLM(nn.Module):
    def __init__(self, vocab_size: int = 32, d_model: int = 16, faults: dict[int, str] | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.A_log = nn.Parameter(torch.linspace(-1.0, 0.5, d_model))
        self.dt_bias = nn.Parameter(torch.zeros(d_model))
        self.D = nn.Parameter(torch.ones(d_model))
        self.proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.faults = dict(faults or {})
        self.calls = 0
        self._inf_next_grad = False
        self.proj.weight.register_hook(self._grad_hook)

    def _grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        if self._inf_next_grad:
            self._inf_next_grad = False
            return torch.full_like(grad, float("inf"))
        return grad

    def allocate_cache(self, batch: int) -> SimpleNamespace:
        """A cache like ``InferenceCache``: one layer whose ``ssm`` state (batch, d_model, 1) the
        forward pass replaces by the final state (differentiably)."""
        d = self.embedding.embedding_dim
        return SimpleNamespace(states=[SimpleNamespace(ssm=torch.zeros(batch, d, 1))], batch=batch)

    def forward(self, input_ids, *, labels=None, cu_seqlens=None, cache=None):
        batch, seqlen = input_ids.shape
        x = self.embedding(input_ids)
        rate = torch.exp(self.A_log) * F.softplus(self.dt_bias)  # (d,)
        t = torch.arange(seqlen, device=x.device)
        gap = (t[:, None] - t[None, :]).to(x.dtype)  # (l, l)
        keep = gap >= 0
        seq = torch.zeros(seqlen, dtype=torch.long, device=x.device)
        if cu_seqlens is not None:
            seq = torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)
            keep = keep & (seq[:, None] == seq[None, :])
        decay = torch.exp(-gap.clamp(min=0)[..., None] * rate) * keep[..., None]  # (l, l, d)
        h = torch.einsum("tsd,bsd->btd", decay, x)
        if cache is not None:
            cache.states[0].ssm = h[:, -1, :, None]
        y = self.proj(h) + self.D * x
        logits = self.head(self.norm(y))
        fault = self.faults.get(self.calls)
        self.calls += 1
        if fault == "inf_grad":
            self._inf_next_grad = True
        loss = None
        if labels is not None:
            targets = labels[:, 1:].clone()
            if cu_seqlens is not None:
                targets = targets.masked_fill((seq[1:] != seq[:-1])[None], -100)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
            )
            if fault == "nan":
                loss = loss * float("nan")
            elif fault == "spike":
                loss = loss * 50.0
        return ToyOutput(logits, loss)
