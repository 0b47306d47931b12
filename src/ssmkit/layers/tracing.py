"""Recording intermediate tensors ("stages") of a forward pass, for the reference-diff tool.

Layers call :func:`record` at the stage boundaries named in ``ssmkit compare``'s table. Outside a
:func:`tracing` block it costs one context-variable lookup and records nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

_active: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "ssmkit_trace", default=None
)


@contextlib.contextmanager
def tracing() -> Iterator[dict[str, torch.Tensor]]:
    """Collect every recorded stage, ``{"layers.3.conv1d": tensor, ...}``, inside the block.

    Tensors are detached copies in fp32 (fp64 stays fp64) laid out (batch, seqlen, ...)."""
    store: dict[str, torch.Tensor] = {}
    token = _active.set(store)
    try:
        yield store
    finally:
        _active.reset(token)


def is_tracing() -> bool:
    return _active.get() is not None


def record(module: nn.Module | None, stage: str, value: torch.Tensor) -> None:
    """Store ``value`` as ``<module.trace_prefix>.<stage>`` when a :func:`tracing` block is active.

    value: (batch, seqlen, ...) — every stage is recorded token-major so the tool can diff per token.
    """
    if (
        torch.compiler.is_compiling()
    ):  # a debugging aid: compiled graphs never record (dynamo cannot trace ContextVars)
        return
    store = _active.get()
    if store is None:
        return
    prefix = getattr(module, "trace_prefix", "") if module is not None else ""
    name = f"{prefix}.{stage}" if prefix else stage
    value = value.detach()
    store[name] = value.clone() if value.dtype == torch.float64 else value.float().clone()
