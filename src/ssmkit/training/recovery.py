"""Recovery tools for SSM parameters that stopped learning or left their healthy range.

- :func:`find_stuck_A` / :func:`reinit_A_`: entries of ``A_log`` whose decay rate ``A = exp(A_log)``
  is not finite or outside ``[a_min, a_max]`` (a state that never forgets, or forgets at once) are
  re-initialised to the usual S4D-Real values, and their Adam moments are zeroed so the optimizer
  does not push them straight back.
- :func:`find_stuck_parameters` / :func:`soft_reset_`: parameters that moved less than a relative
  ``tol`` over a period get Gaussian noise of ``noise_std`` times their own spread.

:class:`Recovery` runs both every ``every`` steps. Noise comes from a generator seeded by
(seed, step, rank) so DDP replicas stay identical and runs are reproducible. Every change is
returned as an event for the log.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from typing import Any

import torch
from torch import nn

from ssmkit.training.config import RecoveryConfig

logger = logging.getLogger(__name__)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def find_stuck_A(model: nn.Module, *, a_min: float, a_max: float) -> dict[str, torch.Tensor]:
    """{name: boolean mask} of the ``A_log`` entries with exp(A_log) non-finite or outside [a_min, a_max]."""
    found = {}
    for name, param in model.named_parameters():
        if name.split(".")[-1] != "A_log":
            continue
        A = torch.exp(_local(param).float())
        mask = ~torch.isfinite(A) | (A < a_min) | (A > a_max)
        if mask.any():
            found[name] = mask
    return found


@torch.no_grad()
def reinit_A_(
    param: torch.Tensor,
    mask: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Re-initialise the masked entries of an ``A_log`` parameter; return how many.

    (rows, d_state) (Mamba-1, S4): A_log[:, j] = log(j + 1) (S4D-Real). (nheads,) (Mamba-2):
    A = uniform in [1, 16], Mamba-2's default range."""
    local = _local(param)
    if local.dim() >= 2:
        fresh = torch.log(torch.arange(1, local.shape[-1] + 1, dtype=torch.float32)).expand(local.shape)
    else:
        fresh = torch.log(torch.empty(local.shape).uniform_(1.0, 16.0, generator=generator))
    fresh = fresh.to(local.device, local.dtype)
    local[mask] = fresh[mask]
    if optimizer is not None:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                _local(value)[mask] = 0.0
    return int(mask.sum())


@torch.no_grad()
def parameter_values(model: nn.Module, patterns: list[str]) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters whose names match ``patterns`` (fnmatch)."""
    return {
        n: _local(p).detach().float().cpu().clone()
        for n, p in model.named_parameters()
        if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)
    }


@torch.no_grad()
def find_stuck_parameters(model: nn.Module, previous: dict[str, torch.Tensor], *, tol: float) -> list[str]:
    """Names whose values moved less than ``tol * ||previous||`` since ``previous`` was taken."""
    stuck = []
    params = dict(model.named_parameters())
    for name, before in previous.items():
        now = _local(params[name]).detach().float().cpu()
        if torch.linalg.vector_norm(now - before) <= tol * max(
            torch.linalg.vector_norm(before).item(), 1e-12
        ):
            stuck.append(name)
    return stuck


@torch.no_grad()
def soft_reset_(param: torch.Tensor, *, noise_std: float, generator: torch.Generator | None = None) -> float:
    """Add N(0, (noise_std * std(param))^2) noise (std 1 for a constant parameter); return the noise std."""
    local = _local(param)
    spread = local.float().std().item() if local.numel() > 1 else 0.0
    scale = noise_std * (spread if math.isfinite(spread) and spread > 0 else 1.0)
    noise = torch.randn(local.shape, generator=generator, dtype=torch.float32) * scale
    local.add_(noise.to(local.device, local.dtype))
    return scale


class Recovery:
    """Periodic checks (see the module docstring); ``step()`` returns the events it caused."""

    def __init__(self, config: RecoveryConfig, *, seed: int = 0, rank: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.rank = rank
        self.previous: dict[str, torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        return self.config.every > 0 and step % self.config.every == 0

    def step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> list[dict[str, Any]]:
        c = self.config
        generator = torch.Generator().manual_seed(hash((self.seed, step, self.rank)) % 2**63)
        params = dict(model.named_parameters())
        events = []
        for name, mask in find_stuck_A(model, a_min=c.a_min, a_max=c.a_max).items():
            count = reinit_A_(params[name], mask, generator=generator, optimizer=optimizer)
            logger.warning("recovery: re-initialised %d stuck entries of %s", count, name)
            events.append({"event": "reinit_A", "param": name, "entries": count})
        if self.previous is not None:
            for name in find_stuck_parameters(model, self.previous, tol=c.stuck_tol):
                scale = soft_reset_(params[name], noise_std=c.noise_std, generator=generator)
                logger.warning(
                    "recovery: %s did not move over %d steps; added noise of std %.3g", name, c.every, scale
                )
                events.append({"event": "soft_reset", "param": name, "noise_std": scale})
        self.previous = parameter_values(model, c.patterns)
        return events
