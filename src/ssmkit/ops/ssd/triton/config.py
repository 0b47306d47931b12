"""Block sizes for the SSD kernels: a small pre-chosen set per GPU generation, no autotuning.

The first call must not stall on a configuration sweep, so each stage reads its tile sizes from
here. On the CPU interpreter every extra loop iteration costs Python time while a larger block
costs only numpy work, so the interpreter gets blocks that cover a whole chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ssmkit.ops.common.overrides import ConfigOverrides


def next_pow2(value: int, minimum: int = 16) -> int:
    """Smallest power of two >= ``value`` and >= ``minimum`` (tl.dot needs each dim >= 16)."""
    size = minimum
    while size < value:
        size *= 2
    return size


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch parameters shared by the stages."""

    block_m: int  # rows of a chunk (positions) per program in the scan-like stages
    block_k: int  # reduction tile over positions inside a chunk
    block_state: int  # tile over headdim / dstate in the state stages
    num_warps: int
    num_stages: int


# The stages that take tiles: the forward's chunk_state (also the backward's d(state) pass), bmm
# (C.B^T), chunk_scan (also the backward's output recomputation), and the backward-only stages.
STAGES = ("chunk_state", "bmm", "chunk_scan", "chunk_scan_bwd", "bmm_bwd", "chunk_state_bwd")

# Overrides for benchmark sweeps: ``with OVERRIDES.forced("chunk_scan", block_m=128): ...``
OVERRIDES = ConfigOverrides(STAGES)
forced = OVERRIDES.forced


# Per-stage departures from a generation's base tiles, each measured: on an H100 (2026-11-23,
# scripts/gpu_check_ssd.py --only sweep, (b, l) = (16, 2048), h=32, p=64, n=128, chunk 256, bf16)
# chunk_scan with block_k=32 took the whole forward from 1.093 to 0.804 ms; no variant of
# chunk_state or bmm moved it by more than 1% (docs/benchmarks.md lists every variant).
_STAGE_TILES = {"sm90": {"chunk_scan": {"block_k": 32}}}


@functools.cache
def _gpu_tiles(capability: tuple[int, int], stage: str | None) -> Tiles:
    if capability[0] >= 9:  # Hopper: more shared memory, deeper pipelines pay off
        base = Tiles(block_m=64, block_k=64, block_state=64, num_warps=4, num_stages=3)
        return dataclasses.replace(base, **_STAGE_TILES["sm90"].get(stage, {}))
    return Tiles(block_m=64, block_k=32, block_state=64, num_warps=4, num_stages=2)


def tiles_for(device: torch.device, chunk_size: int, stage: str | None = None) -> Tiles:
    """Tiles for ``stage`` on ``device``; on the CPU interpreter one block spans the whole (padded)
    chunk. Overrides set with :func:`forced` for ``stage`` apply on top."""
    if device.type != "cuda":
        whole = next_pow2(chunk_size)
        tiles = Tiles(block_m=whole, block_k=whole, block_state=64, num_warps=1, num_stages=1)
    else:
        tiles = _gpu_tiles(torch.cuda.get_device_capability(device), stage)
        # A tile larger than the chunk only adds masked work.
        block_m = min(tiles.block_m, next_pow2(chunk_size))
        block_k = min(tiles.block_k, next_pow2(chunk_size))
        tiles = Tiles(block_m, block_k, tiles.block_state, tiles.num_warps, tiles.num_stages)
    return OVERRIDES.apply(stage, tiles) if stage is not None else tiles
