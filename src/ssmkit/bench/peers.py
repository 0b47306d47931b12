"""Peer libraries we measure ourselves against, imported only when present.

Each loader returns the peer's function, or raises :class:`PeerAbsent` with the reason; benchmarks
print "peer absent" then. ``../shared/tools/peers/prepare.sh DIR`` puts mamba_ssm's Python/Triton
code and flash-linear-attention into ``DIR/site``; pass ``--peers DIR/site`` (or put it on
PYTHONPATH) to use them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path


class PeerAbsent(RuntimeError):
    """The peer library (or the function in it) cannot be imported here."""


def add_peer_path(path: str | None) -> None:
    """Put a peers ``site`` folder on ``sys.path`` (no-op when None or missing)."""
    if path and Path(path).is_dir() and path not in sys.path:
        sys.path.insert(0, path)


def _load(module: str, name: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:  # any import failure means "absent": missing package, CUDA-only deps
        raise PeerAbsent(f"{module}.{name}: {type(exc).__name__}: {exc}") from exc


def mamba_ssd_minimal() -> Callable:
    """mamba_ssm's chunked PyTorch SSD (``ssd_minimal_discrete``: what HF's CPU path computes)."""
    return _load("mamba_ssm.modules.ssd_minimal", "ssd_minimal_discrete")


def mamba_selective_scan_ref() -> Callable:
    """mamba_ssm's sequential PyTorch selective scan (``selective_scan_ref``)."""
    return _load("mamba_ssm.ops.selective_scan_interface", "selective_scan_ref")


def mamba_chunk_scan_combined() -> Callable:
    """mamba_ssm's Triton SSD (``mamba_chunk_scan_combined``)."""
    return _load("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def mamba_selective_state_update() -> Callable:
    """mamba_ssm's Triton decode step."""
    return _load("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")


def mamba_selective_scan_cuda() -> Callable:
    """mamba_ssm's CUDA selective scan (needs its compiled extension, absent in our peer bundle)."""
    fn = _load("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    try:
        importlib.import_module("selective_scan_cuda").fwd  # noqa: B018 - probes the extension
    except Exception as exc:
        raise PeerAbsent(f"selective_scan_cuda extension not built: {exc}") from exc
    return fn


def mamba_rmsnorm_gated() -> Callable:
    """mamba_ssm's Triton gated RMSNorm (``rmsnorm_fn``)."""
    return _load("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn")


def fla_chunk_simple_gla() -> Callable:
    """flash-linear-attention's ``chunk_simple_gla`` (SSD as scalar-gated linear attention)."""
    return _load("fla.ops.simple_gla", "chunk_simple_gla")
