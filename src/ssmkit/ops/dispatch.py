"""Choosing the implementation of an operator: reference, PyTorch fast path, or Triton.

Precedence, highest first: the ``backend=`` argument of a call, the innermost
``with ssmkit.ops.backend(...)`` block, the ``SSMKIT_BACKEND`` environment variable, ``"auto"``.
``"auto"`` picks Triton for CUDA tensors when Triton imports and the operator has Triton kernels,
else the PyTorch fast path. Triton on CPU tensors is allowed only when ``TRITON_INTERPRET=1``
(that is how CI runs the kernels). A missing optional dependency is an error only when that
backend is asked for, never at import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

BackendName = Literal["auto", "reference", "torch", "triton"]
Implementation = Literal["reference", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton")

_state = threading.local()


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: BackendName) -> Iterator[None]:
    """Force an implementation for every operator call inside the block (thread-local).

    >>> with ssmkit.ops.backend("reference"):
    ...     y = ssmkit.ops.selective_scan_fn(u, delta, A, B, C)
    """
    _validate(name, "backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def current_backend() -> str:
    """The backend in force when no per-call argument is given."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("SSMKIT_BACKEND", "").strip().lower()
    if env:
        return _validate(env, "SSMKIT_BACKEND")
    return "auto"


# Checked once at import, without importing triton: torch.compile (dynamo) refuses to trace
# importlib calls, so nothing on the dispatch path may call find_spec while a graph is traced.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_IMPORTABLE


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The operator packages of ssmkit.ops that ship Triton kernels, found once at import from the files
# (no import of triton). Dispatch then only looks names up in a frozenset, which dynamo traces: it
# refuses to trace importlib's find_spec (an H100 run of the stable scan under a fullgraph compile
# failed on exactly that, through a functools.cache wrapper as well).
_OPS_DIR = Path(__file__).resolve().parent
_TRITON_PACKAGES = frozenset(
    f"{__package__}.{entry.name}"
    for entry in _OPS_DIR.iterdir()
    if (entry / "triton" / "__init__.py").is_file()
)


def _has_triton_kernels(op_package: str) -> bool:
    if op_package.startswith(f"{__package__}."):
        return op_package in _TRITON_PACKAGES
    return _has_triton_kernels_elsewhere(op_package)


@functools.cache
def _has_triton_kernels_elsewhere(op_package: str) -> bool:
    """Operator packages outside ssmkit.ops (extensions): looked up once, outside any trace."""
    try:
        return importlib.util.find_spec(f"{op_package}.triton") is not None
    except ModuleNotFoundError:  # the operator package itself is missing
        return False


def resolve(op_package: str, requested: str | None, device: torch.device) -> Implementation:
    """Return the implementation to run for the operator in ``op_package`` on ``device``.

    op_package: the operator's package, e.g. ``"ssmkit.ops.ssd"`` (its Triton kernels live in
    ``<op_package>.triton``).
    """
    name = _validate(requested, "backend") if requested is not None else current_backend()
    if name == "auto":
        if device.type == "cuda" and triton_importable() and _has_triton_kernels(op_package):
            return "triton"
        return "torch"
    if name == "triton":
        if not triton_importable():
            raise RuntimeError(
                "backend 'triton' was requested but the 'triton' package is not installed "
                "(pip install 'ssmkit[triton]')"
            )
        if not _has_triton_kernels(op_package):
            raise NotImplementedError(f"{op_package} has no Triton kernels yet")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors, got tensors on {device}; set "
                "TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter"
            )
        return "triton"
    return name  # type: ignore[return-value]
