"""Non-finite and loss-spike guard with in-memory rollback.

Every step, before the optimizer runs, :meth:`Guard.inspect` looks at the loss and the gradient
norm. A NaN/Inf loss, a non-finite gradient (the offending parameters are named) or a loss above
``spike_factor`` times the running average of good losses makes the step *bad*: the trainer skips
the optimizer step. When ``max_bad_steps`` bad steps fall within ``window`` iterations, the guard
asks for a rollback to the newest of the last ``snapshots`` good in-memory snapshots (model,
optimizer, RNG, data position, schedule) and the learning rate is multiplied by ``lr_factor``
(``spike_lr_factor`` when the step that triggered it was a spike). A snapshot whose continuation
failed again before a newer snapshot was taken is dropped, so repeated failures walk further back.
Every decision is returned as an event for the log; nothing is handled silently.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ssmkit.training.config import GuardConfig

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised when the guard has rolled back ``max_rollbacks`` times and the run still fails."""


@dataclass
class Verdict:
    """ok: the optimizer may step. reason: "nan_loss", "nonfinite_grad" or "loss_spike" when not.
    rollback: restore the newest snapshot and multiply the lr by ``lr_factor``."""

    ok: bool
    reason: str | None = None
    message: str = ""
    rollback: bool = False
    lr_factor: float = 1.0
    bad_params: list[str] = field(default_factory=list)


@dataclass
class Snapshot:
    """A good state kept in host memory: local tensors (FSDP2 shards stay shards)."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]
    extra: dict[str, Any]
    failed_after: int = 0  # rollbacks to this snapshot so far


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def capture_snapshot(
    step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> Snapshot:
    """Copy the model's and the optimizer's tensors to the CPU (``extra``: RNG, data, schedule)."""
    model_state = {n: _local(t).detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
    opt_state = {}
    for group in optimizer.param_groups:
        for name, param in zip(group["param_names"], group["params"]):
            state = optimizer.state.get(param, {})
            opt_state[name] = {
                k: _local(v).detach().to("cpu", copy=True) for k, v in state.items() if torch.is_tensor(v)
            }
    return Snapshot(step, model_state, opt_state, extra)


def restore_snapshot(snapshot: Snapshot, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy a snapshot back in place (parameters keep their identity, so the optimizer's and DDP's
    references stay valid)."""
    with torch.no_grad():
        for name, target in model.state_dict().items():
            _local(target).copy_(snapshot.model[name])
        for group in optimizer.param_groups:
            for name, param in zip(group["param_names"], group["params"]):
                saved = snapshot.optimizer.get(name, {})
                current = optimizer.state.get(param, {})
                if not saved:
                    optimizer.state.pop(param, None)
                elif set(saved) == set(current):
                    for key, value in saved.items():
                        _local(current[key]).copy_(value)
                else:
                    # The snapshot was taken before the optimizer's first step created its state.
                    optimizer.state[param] = {
                        k: v.to(_local(param).device) if v.dim() else v.clone() for k, v in saved.items()
                    }


class Guard:
    """Decides, step by step, whether to apply, skip or roll back (see the module docstring)."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.snapshots: collections.deque[Snapshot] = collections.deque(maxlen=config.snapshots)
        self.bad_iters: collections.deque[int] = collections.deque()
        self.loss_ema = 0.0
        self.good_steps = 0
        self.rollbacks = 0
        self.skipped = 0

    # ---------------------------------------------------------------- the baseline of good losses
    @property
    def baseline(self) -> float | None:
        """Bias-corrected moving average of the good losses, once spike_warmup of them were seen."""
        if self.good_steps < max(1, self.config.spike_warmup):
            return None
        return self.loss_ema / (1.0 - self.config.ema_beta**self.good_steps)

    def record_good(self, loss: float) -> None:
        beta = self.config.ema_beta
        self.loss_ema = beta * self.loss_ema + (1.0 - beta) * loss
        self.good_steps += 1

    # ---------------------------------------------------------------- the decision
    def inspect(
        self, iteration: int, *, loss: float, grad_norm: float, bad_params: list[str] | None = None
    ) -> Verdict:
        """Judge one step. iteration: a counter that never goes back (rollbacks rewind the step)."""
        c = self.config
        if not c.enabled:
            return Verdict(ok=True)
        bad_params = bad_params or []
        if not math.isfinite(loss):
            reason, message = "nan_loss", f"loss is {loss}"
        elif not math.isfinite(grad_norm) or bad_params:
            shown = ", ".join(bad_params[: c.max_names]) + (" ..." if len(bad_params) > c.max_names else "")
            reason = "nonfinite_grad"
            message = (
                f"gradient norm is {grad_norm}; non-finite gradients in {len(bad_params)} tensor(s): {shown}"
            )
        elif self.baseline is not None and loss > c.spike_factor * self.baseline:
            reason = "loss_spike"
            message = f"loss {loss:.4f} is above {c.spike_factor} x the running average {self.baseline:.4f}"
        else:
            return Verdict(ok=True)

        self.skipped += 1
        self.bad_iters.append(iteration)
        while self.bad_iters and self.bad_iters[0] <= iteration - c.window:
            self.bad_iters.popleft()
        rollback = len(self.bad_iters) >= c.max_bad_steps
        factor = (c.spike_lr_factor if reason == "loss_spike" else c.lr_factor) if rollback else 1.0
        if rollback:
            self.bad_iters.clear()
        return Verdict(
            ok=False,
            reason=reason,
            message=message,
            rollback=rollback,
            lr_factor=factor,
            bad_params=list(bad_params),
        )

    # ---------------------------------------------------------------- snapshots
    def wants_snapshot(self, step: int) -> bool:
        return self.config.enabled and step % self.config.snapshot_every == 0

    def add_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)

    def rollback_target(self) -> Snapshot:
        """The snapshot to restore. One that already failed once is dropped in favour of the one
        before it (the oldest is kept whatever happens)."""
        if not self.snapshots:
            raise TrainingDiverged("the guard asked for a rollback but holds no snapshot")
        self.rollbacks += 1
        if self.rollbacks > self.config.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged: {self.config.max_rollbacks} rollbacks did not stop the bad steps "
                f"(lower the learning rate or look at the log's guard events)"
            )
        newest = self.snapshots[-1]
        if newest.failed_after > 0 and len(self.snapshots) > 1:
            logger.warning("snapshot of step %d failed again after a rollback; dropping it", newest.step)
            self.snapshots.pop()
            newest = self.snapshots[-1]
        newest.failed_after += 1
        return newest

    # ---------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_ema": self.loss_ema,
            "good_steps": self.good_steps,
            "rollbacks": self.rollbacks,
            "skipped": self.skipped,
            "bad_iters": list(self.bad_iters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_ema = float(state["loss_ema"])
        self.good_steps = int(state["good_steps"])
        self.rollbacks = int(state["rollbacks"])
        self.skipped = int(state["skipped"])
        self.bad_iters = collections.deque(int(i) for i in state["bad_iters"])
