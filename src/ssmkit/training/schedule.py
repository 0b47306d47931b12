"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to a floor.

``lr_factor(step)`` is a pure function of the step, so resuming needs only the step; the guard's
cumulative reduction (``scale``, x0.7 per rollback) is the schedule's only state.
"""

from __future__ import annotations

import math

import torch

from ssmkit.training.config import ScheduleConfig


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warmup: (step + 1) / warmup_steps, so the first step does not have lr 0. After warmup the factor
    goes from 1 to ``min_ratio`` at the last step (``total_steps - 1``), by a half cosine or a line.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
    return min_ratio + (1.0 - min_ratio) * shape


class LRSchedule:
    """Sets ``lr = base_lr * lr_factor(step) * scale`` on every param group of ``optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int) -> None:
        self.optimizer = optimizer
        self.config = config
        self.total_steps = total_steps
        self.scale = 1.0
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def factor(self, step: int) -> float:
        c = self.config
        return self.scale * lr_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=c.warmup_steps,
            decay=c.decay,
            min_ratio=c.min_lr_ratio,
        )

    def apply(self, step: int) -> float:
        """Set the rates for ``step`` and return the peak group's rate (base_lr * factor)."""
        factor = self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return max(group["base_lr"] for group in self.optimizer.param_groups) * factor

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
