"""Long-context stability: stream very long inputs through a model's inference cache and watch it.

For every length (1k .. 1M tokens) :func:`stream` feeds the tokens in chunks of ``chunk`` (512)
tokens through one cache and reports:

- loss and perplexity of the next-token predictions (every token but the first is scored once);
- tokens/s;
- per SSM layer, the L2 norm of the state per unit (channel or head) after every chunk: the mean
  and the max over the stream, and the *drift*, the relative change of the layer's mean state norm
  between consecutive chunks (bounded dynamics: the drift settles near 0; a state that grows
  without bound keeps a positive drift);
- peak memory (CUDA: the allocator's peak; CPU: the process's resident memory sampled after every
  chunk) and the cache's size in bytes, so :func:`memory_is_flat` can check that memory does not
  grow with the length (an SSM's state is O(1); an attention layer's key/value cache is O(length)).

Context-shift detection (:class:`ContextShiftDetector`): the mean final hidden state of each chunk
is compared with the previous chunk's by cosine similarity; below ``threshold`` (0.8) a shift is
reported, and with ``reset_on_shift`` the cache is reset so the new context starts from a clean
state. Every shift and reset is logged and returned as an event.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.training.state_monitor import ssm_states, unit_norms

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20]


# ---------------------------------------------------------------- memory
def resident_bytes() -> int:
    """The process's current resident memory (Linux /proc; elsewhere the peak, which is all the
    standard library offers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class MemoryMeter:
    """Peak memory over a stretch of work. CUDA: ``max_memory_allocated`` since :meth:`start`
    (exact, tensors only). CPU: the largest resident size seen by :meth:`sample` (whole process,
    includes the allocator's slack, so compare figures, do not read them as tensor bytes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = 0
        self.sample()

    def sample(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            current = torch.cuda.max_memory_allocated(self.device)
        else:
            current = resident_bytes()
        self.peak = max(self.peak, current)
        return current


# ---------------------------------------------------------------- context shifts
class ContextShiftDetector:
    """Flags a context shift when the cosine similarity between the mean hidden state of the newest
    chunk and of the chunk before falls below ``threshold``.

    summary: (d_model,) the chunk's mean final hidden state (for a batch, the mean over it too)."""

    def __init__(self, threshold: float = 0.8) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
        self.threshold = threshold
        self.previous: torch.Tensor | None = None

    def update(self, summary: torch.Tensor) -> tuple[float | None, bool]:
        """(cosine with the previous chunk or None for the first, shift detected)."""
        summary = summary.detach().double().flatten()
        previous, self.previous = self.previous, summary
        if previous is None:
            return None, False
        cosine = F.cosine_similarity(summary, previous, dim=0).item()
        return cosine, cosine < self.threshold

    def reset(self) -> None:
        self.previous = None


# ---------------------------------------------------------------- streaming
@dataclass
class LayerStats:
    """State norms of one SSM layer over a stream: mean and max per-unit L2 norm over every chunk;
    drift: relative change of the layer's mean norm between consecutive chunks (mean, max, last)."""

    layer: int
    mean: float
    max: float
    drift_mean: float
    drift_max: float
    drift_last: float


@dataclass
class LengthReport:
    length: int
    chunk: int
    tokens_scored: int
    loss: float
    perplexity: float
    seconds: float
    tokens_per_s: float
    peak_memory_bytes: int
    cache_bytes: int
    layers: list[LayerStats] = field(default_factory=list)
    shifts: list[dict[str, Any]] = field(default_factory=list)
    finite: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _final_hidden_hook(model: nn.Module, store: list[torch.Tensor]):
    """Keep the final-norm output (batch, seqlen, d_model) of every forward in ``store``."""
    norm = getattr(model, "norm_f", None)
    if norm is None:
        return None
    return norm.register_forward_hook(lambda module, args, output: store.append(output.detach()))


@torch.no_grad()
def stream(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    chunk: int = 512,
    shift_threshold: float | None = 0.8,
    reset_on_shift: bool = False,
) -> LengthReport:
    """Stream ``tokens``: (batch, length) ids through one inference cache, ``chunk`` tokens at a time.

    shift_threshold: cosine threshold of the context-shift detector (None: off). reset_on_shift:
    reset the cache when a shift is detected (after the chunk that revealed it)."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens must have shape (batch, length) with length >= 2, got {tuple(tokens.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch, length = tokens.shape
    meter = MemoryMeter(device)
    detector = ContextShiftDetector(shift_threshold) if shift_threshold is not None else None
    hidden: list[torch.Tensor] = []
    hook = _final_hidden_hook(model, hidden) if detector is not None else None
    cache = model.allocate_cache(batch)
    meter.start()

    nll, scored = 0.0, 0
    finite = True
    previous_last: torch.Tensor | None = None
    layer_means: dict[int, list[float]] = {}
    layer_maxes: dict[int, list[float]] = {}
    shifts: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for start in range(0, length, chunk):
            piece = tokens[:, start : start + chunk].to(device)
            logits = model(piece, cache=cache).logits
            # Cross entropy in fp32 at least (fp64 stays fp64): bf16 log-softmax is too coarse.
            logits = logits if logits.dtype == torch.float64 else logits.float()
            if previous_last is not None:
                nll += F.cross_entropy(previous_last, piece[:, 0], reduction="sum").double().item()
                scored += batch
            if piece.shape[1] > 1:
                flat = logits[:, :-1].reshape(-1, logits.shape[-1])
                nll += F.cross_entropy(flat, piece[:, 1:].reshape(-1), reduction="sum").double().item()
                scored += batch * (piece.shape[1] - 1)
            previous_last = logits[:, -1]
            for index, state in ssm_states(cache):
                norms = unit_norms(state)
                layer_means.setdefault(index, []).append(norms.mean().item())
                layer_maxes.setdefault(index, []).append(norms.max().item())
            if detector is not None and hidden:
                cosine, shifted = detector.update(hidden[-1].float().mean(dim=(0, 1)))
                hidden.clear()
                if shifted:
                    event = {"position": start, "cosine": cosine, "reset": reset_on_shift}
                    shifts.append(event)
                    logger.warning(
                        "context shift at token %d: cosine %.3f < %.2f%s",
                        start,
                        cosine,
                        detector.threshold,
                        "; state reset" if reset_on_shift else "",
                    )
                    if reset_on_shift:
                        cache.reset()
                        detector.reset()
            meter.sample()
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started

    layers = []
    for index in sorted(layer_means):
        means, maxes = layer_means[index], layer_maxes[index]
        finite = finite and all(math.isfinite(v) for v in means + maxes)
        drifts = [
            abs(b - a) / a if a > 0 else (0.0 if b == 0 else math.inf) for a, b in zip(means, means[1:])
        ]
        layers.append(
            LayerStats(
                layer=index,
                mean=sum(means) / len(means),
                max=max(maxes),
                drift_mean=sum(drifts) / len(drifts) if drifts else 0.0,
                drift_max=max(drifts) if drifts else 0.0,
                drift_last=drifts[-1] if drifts else 0.0,
            )
        )
    loss = nll / scored
    finite = finite and math.isfinite(loss)
    return LengthReport(
        length=length,
        chunk=chunk,
        tokens_scored=scored,
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        seconds=seconds,
        tokens_per_s=batch * length / seconds if seconds > 0 else math.nan,
        peak_memory_bytes=meter.peak,
        cache_bytes=cache.nbytes(),
        layers=layers,
        shifts=shifts,
        finite=finite,
    )


def memory_is_flat(
    reports: list[LengthReport], *, tolerance: float = 0.1, slack_bytes: int = 0
) -> dict[str, Any]:
    """Whether memory stays flat from the shortest to the longest stream: the cache's size must not
    change, and the peak must not grow by more than ``tolerance`` (relative) plus ``slack_bytes``
    (for the CPU's resident-memory noise). Returns the figures and the verdict."""
    if len(reports) < 2:
        raise ValueError(f"memory_is_flat needs reports for at least 2 lengths, got {len(reports)}")
    ordered = sorted(reports, key=lambda r: r.length)
    short, long = ordered[0], ordered[-1]
    growth = (long.peak_memory_bytes - short.peak_memory_bytes) / max(1, short.peak_memory_bytes)
    cache_growth = long.cache_bytes / max(1, short.cache_bytes)
    flat = long.cache_bytes == short.cache_bytes and (
        long.peak_memory_bytes <= short.peak_memory_bytes * (1 + tolerance) + slack_bytes
    )
    return {
        "flat": flat,
        "short_length": short.length,
        "long_length": long.length,
        "peak_growth": growth,
        "cache_growth": cache_growth,
        "tolerance": tolerance,
        "slack_bytes": slack_bytes,
    }


def synthetic_tokens(length: int, vocab_size: int, *, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(batch, length) uniform random ids: stability and memory need no meaningful text."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def cycle_tokens(ids: torch.Tensor, length: int) -> torch.Tensor:
    """(1, length): ``ids`` (num_tokens,) repeated until ``length`` tokens (a text shorter than the
    stream is read again from its start)."""
    if ids.numel() == 0:
        raise ValueError("cannot stream an empty token sequence")
    repeats = -(-length // ids.numel())
    return ids.repeat(repeats)[:length][None]


def run_long_context(
    model: nn.Module,
    token_source: Any,
    *,
    lengths: list[int] | None = None,
    chunk: int = 512,
    shift_threshold: float | None = 0.8,
    reset_on_shift: bool = False,
    callback: Any = None,
) -> dict[str, Any]:
    """Stream every length of ``lengths`` (default :data:`DEFAULT_LENGTHS`); ``token_source(length)``
    returns the (batch, length) ids to stream. A short warm-up stream runs first so that one-off
    allocations (kernels, allocator pools) do not count as growth. Returns the reports and the
    flat-memory verdict."""
    lengths = sorted(lengths or DEFAULT_LENGTHS)
    device = next(model.parameters()).device
    stream(model, token_source(min(lengths[0], 2 * chunk)), chunk=chunk, shift_threshold=None)
    reports = []
    for length in lengths:
        report = stream(
            model,
            token_source(length),
            chunk=chunk,
            shift_threshold=shift_threshold,
            reset_on_shift=reset_on_shift,
        )
        reports.append(report)
        if callback is not None:
            callback(report)
    # Resident memory on a CPU moves by a few MiB for reasons unrelated to the model (allocator
    # arenas, Python objects); on CUDA the allocator's peak is exact and needs no slack.
    slack = 0 if device.type == "cuda" else 64 * 2**20
    verdict = memory_is_flat(reports, slack_bytes=slack) if len(reports) > 1 else None
    return {
        "device": str(device),
        "chunk": chunk,
        "reports": [r.to_dict() for r in reports],
        "memory": verdict,
    }
