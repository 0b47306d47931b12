"""Block sizes for the fused selective-scan kernels, chosen once per call from coarse size buckets.

No autotuning: a kernel program holds (channels, time) tiles of fp32 values in registers, so the
useful block sizes follow from a register budget (tile elements per thread), the same for every
input. The tables below are per GPU generation (sm80 = A100, sm90 = H100; other devices use the
sm80 choice); ``forced`` overrides them for benchmarks (scripts/gpu_check_selective_scan.py
--sweep times a few alternatives).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ssmkit.ops.common.overrides import ConfigOverrides


@dataclass(frozen=True)
class ScanConfig:
    """block_d channels x block_n state entries x block_l time steps per tile; num_warps per program;
    product_form: in-block scans by segment-decay products (CPU interpreter only, see scan_common)."""

    block_d: int
    block_n: int
    block_l: int
    num_warps: int
    product_form: bool = False


# Overrides for benchmarks: ``with forced("forward", block_d=8): ...`` (a forced block_d must still
# divide dim // ngroups when ngroups > 1; not checked, benchmark use).
OVERRIDES = ConfigOverrides(("forward", "backward"))
forced = OVERRIDES.forced


def next_power_of_2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _generation(device_index: int) -> str:
    major, _ = torch.cuda.get_device_capability(device_index)
    return "sm90" if major >= 9 else "sm80"


# Per stage and generation: the time block, the tile elements (block_d * block_l) per program and the
# tile elements per thread. A program walks the state indices one at a time over a (block_d,
# block_l) tile whose time axis is spread over the threads (8 consecutive steps per thread, then
# across the 32 lanes of a warp, so with block_l = 256 each warp scans whole rows and no scan
# crosses warps). Compiled for sm_90 (ptxas -v), the forward at (4, 256, 4 warps) uses 148
# registers and the backward at (2, 256, 4 warps) 146, without spills; twice the elements per
# thread pushes both past 220 registers (two programs per SM instead of three).
_TABLES = {
    # sm90 from a sweep on an H100 (2026-11-23, scripts/gpu_check_selective_scan.py --sweep,
    # b=2 d=1536 n=16 l=2048 bf16, CUDA-graph medians): forward (1 channel x 512 steps, 2 warps)
    # 219 µs against 272 µs for (4 x 256, 4 warps); forward+backward with the backward at
    # (1 x 1024, 4 warps) 1038 µs against 1633 µs for (2 x 256, 4 warps). One program per channel
    # gives 3072 programs at that size instead of 768, which hides the scan's latency better.
    "sm90": {"forward": (512, 512, 8), "backward": (1024, 1024, 8)},
    "sm80": {"forward": (256, 1024, 8), "backward": (256, 512, 4)},
    # The CPU interpreter pays per tile operation, not per element: few wide programs. Its
    # segment-decay form of the scans is O(block_l^2), hence short blocks (see scan_common).
    "interpreter": {"forward": (8, 512, 512), "backward": (8, 512, 512)},
}


def _largest_power_of_2_dividing(value: int, limit: int) -> int:
    block = 1
    while block * 2 <= limit and value % (block * 2) == 0:
        block *= 2
    return block


def choose_config(
    dim: int,
    dstate: int,
    ngroups: int,
    seqlen: int,
    device: torch.device,
    stage: str,
    block_l: int | None = None,
) -> ScanConfig:
    """Pick block sizes for ``stage`` ("forward" or "backward"); ``block_l`` forces the time block
    (the forward of a training step uses the backward's, whose block boundaries it saves states at).

    A program's channel block must lie inside one group of B/C (it loads the group's B and C rows),
    so with ngroups > 1 block_d divides dim // ngroups; with one group any block_d works and the
    last block is masked.
    """
    generation = _generation(device.index or 0) if device.type == "cuda" else "interpreter"
    max_block_l, tile, per_thread = _TABLES[generation][stage]
    forced_block_l = block_l
    if block_l is None:
        block_l = min(max_block_l, max(16 if generation != "interpreter" else 8, next_power_of_2(seqlen)))
    block_d = max(1, tile // block_l)
    block_d = min(block_d, next_power_of_2(dim))
    if ngroups > 1:
        block_d = _largest_power_of_2_dividing(dim // ngroups, block_d)
    num_warps = min(8, max(1, block_d * block_l // (32 * per_thread)))
    config = ScanConfig(
        block_d=block_d,
        block_n=next_power_of_2(dstate),
        block_l=block_l,
        num_warps=num_warps,
        product_form=generation == "interpreter",
    )
    overrides = OVERRIDES.fields(stage)
    if forced_block_l is not None:
        overrides.pop("block_l", None)  # the backward's block boundaries win
    return dataclasses.replace(config, **overrides)
