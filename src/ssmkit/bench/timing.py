"""Timing that does not lie: warm-up, alternation between candidates, medians.

On a GPU, Python launch overhead leaks into eager timings (the same kernel timed twice back to back
differed by 1.4x on our H100s), so forward passes are timed inside CUDA graphs. Candidates are
timed in alternating rounds (ours, peer, ours, peer, ...) so that clock and thermal drift hit all
of them alike, and the median over rounds is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Median seconds over rounds, with every round kept for the JSON record."""

    rounds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds) if self.rounds else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_cpu(fn: Callable[[], object], min_seconds: float = 0.2, max_calls: int = 50) -> float:
    """Mean seconds per call of ``fn`` over enough calls to fill ``min_seconds`` (at least one)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or calls >= max_calls:
            return elapsed / calls


def time_once_cuda_eager(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Mean seconds per call of ``fn`` launched eagerly, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync(device)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    _sync(device)
    return start.elapsed_time(end) / 1e3 / repeats


def time_once_cuda_graph(fn: Callable[[], object], rep_ms: int = 40) -> float:
    """Median seconds per call of ``fn`` replayed inside a CUDA graph (launch overhead removed)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") / 1e3


def alternate(
    candidates: dict[str, Callable[[], float]],
    rounds: int = 5,
    warmup: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Run each candidate's timer once per round, in turn, for ``rounds`` rounds.

    candidates: name -> a function that times one measurement and returns seconds.
    warmup: called once per candidate before the rounds start (compilation, autotuning, caches).
    """
    if warmup is not None:
        for name in candidates:
            warmup(name)
    results = {name: Timing() for name in candidates}
    for _ in range(rounds):
        for name, timer in candidates.items():
            results[name].rounds.append(timer())
    return results
