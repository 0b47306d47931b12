"""Decode steps on a cache the runner owns: eager, or replayed from a CUDA graph captured once per
batch-size bucket.

A decode step of a small model is a few hundred small kernels (the runner's step,
:func:`ssmkit.inference.decode.decode_step`, fuses each block's residual add with the next norm); at
batch 1 launching them from Python costs more than running them. A CUDA graph records the launches
once and replays them with one call. That needs every tensor the step touches to stay where it was
at capture time: the cache is preallocated (SSM states and a
:class:`~ssmkit.layers.attention.StaticKVState` per attention layer, never reallocated), the input
tokens and output logits live in static buffers, and nothing in the step reads device values on the
host. Batches are rounded up to a bucket (1, 2, 4, 8, 16, ...): one graph serves every batch size up
to its bucket, the extra rows decode garbage that nobody reads.

When capture fails (no CUDA device, a layer that synchronises with the host such as the routed
mixture of experts, too little memory), the runner logs why and runs the same step eagerly.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ssmkit.inference.decode import decode_step
from ssmkit.layers.attention import StaticKVState
from ssmkit.models.cache import InferenceCache

logger = logging.getLogger(__name__)

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Eager steps before capture: Triton compiles and autotunes, cuBLAS picks its algorithms and the
# caching allocator settles, none of which may happen inside a capture.
WARMUP_STEPS = 2


def bucket_for(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket holding ``batch`` rows; a batch above the largest bucket is its own bucket."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    for size in sorted(buckets):
        if size >= batch:
            return size
    return batch


@dataclass
class _Entry:
    """One bucket: its cache, static input/output buffers and the replay function (None: eager)."""

    cache: InferenceCache
    tokens: torch.Tensor  # (rows,) int64, the step's input
    logits: torch.Tensor | None = None  # (rows, vocab), the step's output, allocated by the first run
    replay: Callable[[], None] | None = None


class DecodeRunner:
    """Runs one-token decode steps of ``model`` for batches of up to any size.

    ``prepare(batch, max_length)`` returns a reset cache with at least ``batch`` rows and room for
    ``max_length`` positions per row (fill its rows, e.g. with ``InferenceCache.copy_rows_``), then
    ``step(tokens)`` feeds tokens: (batch,) int64 and returns logits: (batch, vocab) of the next
    position (a view of a static buffer, overwritten by the next step).

    cuda_graph: None (default) captures CUDA graphs when the model is on a CUDA device; True
    requires a CUDA device; False always runs eagerly. Caches and graphs are kept per bucket and
    reused by later ``prepare`` calls whose ``max_length`` fits.
    """

    def __init__(
        self, model: nn.Module, *, cuda_graph: bool | None = None, buckets: tuple[int, ...] = BUCKETS
    ) -> None:
        device = model.embedding.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        # A weak reference: runners are shared per model (see runner_for) and must not keep it alive.
        self._model = weakref.ref(model)
        self.device = device
        self.use_graphs = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.buckets = buckets
        self.fallback_reason: str | None = None
        self._entries: dict[int, _Entry] = {}
        self._current: _Entry | None = None
        self._pool = None
        self._signature = self._model_signature(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this DecodeRunner no longer exists")
        return model

    @staticmethod
    def _model_signature(model: nn.Module) -> tuple:
        # Graphs hold raw addresses: moving or converting the model (new parameter tensors) must
        # invalidate them.
        return tuple((p.data_ptr(), p.dtype) for p in model.parameters())

    @property
    def cache(self) -> InferenceCache | None:
        """The cache of the current bucket (the one the last ``prepare`` returned)."""
        return None if self._current is None else self._current.cache

    @property
    def graphed(self) -> bool:
        """Whether the current bucket replays a CUDA graph."""
        return self._current is not None and self._current.replay is not None

    def rows_for(self, batch: int) -> int:
        return bucket_for(batch, self.buckets) if self.use_graphs else batch

    def prepare(self, batch: int, max_length: int) -> InferenceCache:
        """A reset cache with ``rows_for(batch)`` rows and KV room for ``max_length`` positions."""
        model = self.model
        signature = self._model_signature(model)
        if signature != self._signature:
            self.release()
            self._signature = signature
        rows = self.rows_for(batch)
        entry = self._entries.get(rows)
        if entry is None or (_has_kv(entry.cache) and (entry.cache.max_length or 0) < max_length):
            # Drop the old bucket first: its cache and graph memory go back before the new one is built.
            self._entries.pop(rows, None)
            entry = self._current = None
            entry = self._build(model, rows, max_length)
            self._entries[rows] = entry
        entry.cache.reset()
        self._current = entry
        return entry.cache

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (batch,) int64 on the model's device -> logits: (batch, vocab) (a static buffer)."""
        entry = self._current
        if entry is None:
            raise RuntimeError("call prepare(batch, max_length) before step()")
        batch = tokens.shape[0]
        if batch > entry.tokens.shape[0]:
            raise ValueError(f"tokens has {batch} rows, the prepared cache {entry.tokens.shape[0]}")
        entry.tokens[:batch].copy_(tokens)
        if entry.replay is not None:
            entry.replay()
            entry.cache.seqlen_offset += 1  # the replay does not run the model's host-side bookkeeping
        else:
            self._run_static(entry)
        return entry.logits[:batch]

    def release(self) -> None:
        """Free every bucket's cache and graph."""
        self._entries.clear()
        self._current = None
        self._pool = None

    # ---------------------------------------------------------------- internals
    def _run_static(self, entry: _Entry) -> None:
        """The decode step on the static buffers: what is captured, and what runs when not graphed."""
        out = decode_step(self.model, entry.tokens[:, None], entry.cache)
        if entry.logits is None:
            entry.logits = torch.empty_like(out)
        entry.logits.copy_(out)

    def _build(self, model: nn.Module, rows: int, max_length: int) -> _Entry:
        cache = InferenceCache.allocate(model, rows, max_length=max_length)
        entry = _Entry(cache=cache, tokens=torch.zeros(rows, dtype=torch.int64, device=self.device))
        if not self.use_graphs:
            return entry
        try:
            entry.replay = self._capture(entry)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.fallback_reason = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "CUDA graph capture failed for batch bucket %d (%s); decoding eagerly from now on",
                rows,
                self.fallback_reason,
            )
            self.use_graphs = False
            entry.replay = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        cache.reset()
        return entry

    def _capture(self, entry: _Entry) -> Callable[[], None]:
        """Warm up on a side stream, then record one decode step; returns the replay function."""
        device = self.device
        cache = entry.cache
        with torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    cache.reset()
                    cache.seqlen_offset = 1  # one token on a non-empty cache: the model's decode path
                    self._run_static(entry)
            torch.cuda.current_stream(device).wait_stream(side)
            cache.reset()
            cache.seqlen_offset = 1
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._run_static(entry)
        return graph.replay


def _has_kv(cache: InferenceCache) -> bool:
    """Whether the cache holds keys/values (max_length matters); SSM states fit any length."""
    return any(isinstance(state, StaticKVState) for state in cache.states)


_shared: weakref.WeakKeyDictionary[nn.Module, DecodeRunner] = weakref.WeakKeyDictionary()


def runner_for(model: nn.Module, *, cuda_graph: bool | None = None) -> DecodeRunner:
    """The DecodeRunner shared by every generate call on ``model`` (captured graphs are reused), or a
    fresh one when the requested cuda_graph setting differs from the shared runner's."""
    runner = _shared.get(model)
    wanted = model.embedding.weight.device.type == "cuda" if cuda_graph is None else cuda_graph
    if (
        runner is None
        or runner.device != model.embedding.weight.device
        or (runner.use_graphs != wanted and runner.fallback_reason is None)
    ):
        runner = DecodeRunner(model, cuda_graph=cuda_graph)
        _shared[model] = runner
    return runner
