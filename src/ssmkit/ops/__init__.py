"""State space operators, each with a sequential reference and fast paths behind one function.

Public functions (signatures follow ``mamba_ssm`` / ``causal_conv1d``):

- :func:`selective_scan_fn` — Mamba-1 (S6) selective scan.
- :func:`mamba_chunk_scan_combined` — Mamba-2 SSD chunked scan.
- :func:`selective_state_update` — one decode step (Mamba-1 and Mamba-2 state layouts).
- :func:`causal_conv1d_fn`, :func:`causal_conv1d_update` — causal depthwise conv1d.
- :func:`rms_norm_gated`, :func:`rms_norm` — (gated) RMSNorm; :func:`add_rms_norm` — residual add + RMSNorm.
- :mod:`ssmkit.ops.s4` — S4D discretization, recurrent, convolution and FFT forms.
- :func:`backend` — context manager choosing the implementation for a block of code.

Submodules are imported lazily so that ``import ssmkit.ops`` never pulls in Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ssmkit.ops.dispatch import backend, current_backend

_LAZY = {
    "selective_scan_fn": "ssmkit.ops.selective_scan.interface",
    "mamba_chunk_scan_combined": "ssmkit.ops.ssd.interface",
    "selective_state_update": "ssmkit.ops.step.interface",
    "causal_conv1d_fn": "ssmkit.ops.conv1d.interface",
    "causal_conv1d_update": "ssmkit.ops.conv1d.interface",
    "rms_norm_gated": "ssmkit.ops.norm.interface",
    "rms_norm": "ssmkit.ops.norm.interface",
    "add_rms_norm": "ssmkit.ops.norm.interface",
}

__all__ = [
    "add_rms_norm",
    "backend",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "current_backend",
    "mamba_chunk_scan_combined",
    "rms_norm",
    "rms_norm_gated",
    "s4",
    "selective_scan_fn",
    "selective_state_update",
]

if TYPE_CHECKING:  # pragma: no cover - for static analysis only
    from ssmkit.ops import s4
    from ssmkit.ops.conv1d.interface import causal_conv1d_fn, causal_conv1d_update
    from ssmkit.ops.norm.interface import add_rms_norm, rms_norm, rms_norm_gated
    from ssmkit.ops.selective_scan.interface import selective_scan_fn
    from ssmkit.ops.ssd.interface import mamba_chunk_scan_combined
    from ssmkit.ops.step.interface import selective_state_update


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "s4":
        return importlib.import_module("ssmkit.ops.s4")
    raise AttributeError(f"module 'ssmkit.ops' has no attribute {name!r}")
