"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p.

Everything here runs on the device without host synchronisation (no ``.item()``, no data-dependent
shapes), so a decode loop never waits on the GPU to pick a token. Filters follow the conventions of
``transformers``' logits processors (ties at the top-k boundary are kept; top-p keeps the smallest
set of most likely tokens whose probability reaches p; min-p drops tokens below min_p times the most
likely one's probability), which the tests use as the independent reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How the next token is chosen.

    temperature: 0 picks the most likely token (greedy); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (None or 0: all). top_p: keep the most likely tokens whose
    probabilities sum to at least p (None or 1: all). min_p: drop tokens less likely than min_p times
    the most likely one (None or 0: none). repetition_penalty: > 1 discourages tokens already in the
    prompt or the output (positive logits divided by it, negative ones multiplied, as in CTRL).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the argument when a value is out of range."""
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: none), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: (batch, vocab) float; seen: (batch, vocab) bool, the tokens already in each row's
    prompt or output. Returns new logits: seen positive logits / penalty, seen negative ones * penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits: (batch, vocab). Logits below the k-th largest of their row become -inf (ties kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits: (batch, vocab). Keep the most likely tokens until their probabilities sum to at least
    p (the most likely token always stays); the others become -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token goes when the more likely ones before it already reach p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits: (batch, vocab). Tokens whose probability is below min_p times their row's largest
    probability become -inf (the most likely token always stays)."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def filter_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The logits the next token is drawn from, in fp32 (fp64 stays): repetition penalty, then
    temperature, top-k, top-p, min-p (transformers' order). logits: (batch, vocab); seen: (batch,
    vocab) bool, needed when a repetition penalty is set."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if params.uses_history:
        if seen is None:
            raise ValueError("a repetition_penalty needs seen, the (batch, vocab) mask of tokens so far")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p:
        logits = min_p_filter(logits, params.min_p)
    return logits


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row. logits: (batch, vocab); seen: (batch, vocab) bool or None.
    Returns tokens: (batch,) int64, on the logits' device.

    Sampling draws q ~ Exponential(1) per token and takes argmax(probs / q): that picks token i with
    probability probs[i] (the exponential race), like torch.multinomial, but with no host
    synchronisation and a result fixed by the generator's seed.
    """
    logits = filter_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
