"""Mamba-2 SSD (state space duality) operator.

- :mod:`.reference` — sequential recurrence over time, the ground truth (fp64-capable).
- :mod:`.chunked` — the chunked matrix form in PyTorch, the CPU fast path.
- ``.triton`` — GPU kernels, imported only when that backend runs.
- :mod:`.interface` — :func:`mamba_chunk_scan_combined`, checks and dispatch.
"""

from ssmkit.ops.ssd.interface import mamba_chunk_scan_combined

__all__ = ["mamba_chunk_scan_combined"]
