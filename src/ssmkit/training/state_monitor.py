"""SSM state norms per layer, and a penalty on them.

The final SSM state of every layer is read from an inference cache filled by a forward pass
(``model.allocate_cache(batch)``, ``model(input_ids, cache=cache)``), so any model following the
``ssmkit.models`` contract works and no layer needs a hook. A state ``(batch, units, ...)`` — units
are Mamba-1/S4 channels ``(batch, d_inner, d_state)`` or Mamba-2 heads ``(batch, nheads, headdim,
d_state)`` — gives one L2 norm per (sequence, unit); a layer reports their mean and max.
Attention layers have no SSM state and are left out.

The penalty, ``mean over layers of mean(relu(norm - target)^2)``, is differentiable when the cache
was filled with gradients enabled (the layers copy their final states into the cache).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ssmkit.training.config import MonitorConfig

logger = logging.getLogger(__name__)


def ssm_states(cache: Any) -> list[tuple[int, torch.Tensor]]:
    """(layer index, state (batch, units, ...)) for every layer of ``cache`` with an SSM state."""
    return [(i, state.ssm) for i, state in enumerate(cache.states) if getattr(state, "ssm", None) is not None]


def unit_norms(state: torch.Tensor) -> torch.Tensor:
    """state: (batch, units, ...) -> (batch, units) L2 norms, in fp32 (fp64 stays fp64)."""
    dtype = torch.float64 if state.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(state.to(dtype).flatten(2), dim=-1)


def state_penalty(cache: Any, target: float) -> torch.Tensor:
    """Mean over SSM layers of mean((norm - target)_+^2); 0 when the model has no SSM layer."""
    terms = [torch.relu(unit_norms(state) - target).pow(2).mean() for _, state in ssm_states(cache)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def supports_states(model: nn.Module) -> bool:
    return callable(getattr(model, "allocate_cache", None))


class StateMonitor:
    """Every ``config.state_every`` steps: per-layer state norms of a probe batch, a warning above
    ``config.state_warn``, an error-level log line when a state is not finite."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._warned_unsupported = False

    def due(self, step: int) -> bool:
        return self.config.state_every > 0 and step % self.config.state_every == 0

    @torch.no_grad()
    def measure(self, model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any] | None:
        """input_ids: (batch, seqlen). Returns {"layers": {i: {"mean", "max"}}, "warnings": [...],
        "nonfinite": [...]}, or None for a model without an inference cache."""
        if not supports_states(model):
            if not self._warned_unsupported:
                logger.warning(
                    "state monitor: %s has no allocate_cache(); state norms are not measured",
                    type(model).__name__,
                )
                self._warned_unsupported = True
            return None
        cache = model.allocate_cache(input_ids.shape[0])
        model(input_ids, cache=cache)
        return self.summarise(cache)

    def summarise(self, cache: Any) -> dict[str, Any]:
        layers, warnings, nonfinite = {}, [], []
        for index, state in ssm_states(cache):
            norms = unit_norms(state.detach())
            mean, peak = norms.mean().item(), norms.max().item()
            layers[index] = {"mean": mean, "max": peak}
            if not (math.isfinite(mean) and math.isfinite(peak)):
                nonfinite.append(index)
                logger.error("state monitor: layer %d has a non-finite SSM state", index)
            elif peak > self.config.state_warn:
                warnings.append(index)
                logger.warning(
                    "state monitor: layer %d state norm %.3g exceeds %.3g",
                    index,
                    peak,
                    self.config.state_warn,
                )
        return {"layers": layers, "warnings": warnings, "nonfinite": nonfinite}
