"""Mamba-1 selective scan (S6) operator.

- :mod:`.reference` — sequential recurrence over time, the ground truth (fp64-capable).
- :mod:`.chunked` — the chunked two-pass scan in PyTorch, the CPU fast path.
- ``.triton`` — GPU kernels, imported only when that backend runs.
- :mod:`.interface` — :func:`selective_scan_fn`, checks and dispatch.
"""

from ssmkit.ops.selective_scan.interface import selective_scan_fn

__all__ = ["selective_scan_fn"]
