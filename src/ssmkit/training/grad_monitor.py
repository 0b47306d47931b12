"""Gradients: norms and clipping, per-parameter statistics, and a pathology detector.

:func:`gradient_norms` computes one norm per parameter (so that a non-finite total can be traced
to the parameters that caused it) and :func:`clip_gradients` scales by max_norm / total.
:class:`GradientMonitor` reports every ``every`` steps, per parameter, the mean, std, min, max
and non-finite count of its gradient and three pathologies:

- sparsity: more than ``sparsity_threshold`` of the entries are exactly zero (dead units);
- flip-flop: cosine with the previous step's gradient below ``flip_cosine`` (oscillation);
- collapse: gradient norm below ``collapse_norm`` (the parameter no longer learns).

The score is the fraction of (parameter, pathology) pairs that fire; above ``alert_score`` the
report carries an alert. Statistics are on this rank's gradients after DDP's all-reduce (FSDP2:
this rank's shard).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ssmkit.training.config import MonitorConfig

logger = logging.getLogger(__name__)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def named_grads(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, parameter, gradient) for every parameter that has a gradient."""
    return [(n, p, p.grad) for n, p in model.named_parameters() if p.grad is not None]


def _one_foreach_group(grads: list[torch.Tensor]) -> bool:
    """Plain fp32 tensors on one device: what the multi-tensor (foreach) kernels take in one launch.
    Each per-parameter op costs a launch otherwise (a few hundred per step for a small model: on a
    GPU host that is milliseconds of Python and launch time)."""
    first = grads[0]
    return all(
        type(g) is torch.Tensor and g.dtype == torch.float32 and g.device == first.device for g in grads
    )


def gradient_norms(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-parameter L2 norms (num_params,) fp32, total L2 norm) — Inf/NaN propagate into both.

    Under FSDP2 a shard's norm is a partial result: ``full_tensor()`` sums the squares over ranks."""
    if not grads:
        zero = torch.zeros(())
        return zero[None][:0], zero
    if _one_foreach_group(grads):
        per_param = torch.stack(torch._foreach_norm(grads, 2))
        return per_param, torch.linalg.vector_norm(per_param)
    norms = []
    for grad in grads:
        # Accumulate in fp32 at least (vector_norm refuses to narrow fp64 to fp32).
        wide = grad.dtype == torch.float64
        norm = (
            torch.linalg.vector_norm(grad).float()
            if wide
            else torch.linalg.vector_norm(grad, dtype=torch.float32)
        )
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norms.append(norm)
    per_param = torch.stack(norms)
    return per_param, torch.linalg.vector_norm(per_param)


def clip_gradients(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients by min(1, max_norm / total_norm) (torch's clip_grad_norm_ rule)."""
    if max_norm <= 0 or not grads:
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if _one_foreach_group(grads):
        torch._foreach_mul_(grads, coef.to(grads[0].device))
        return
    for grad in grads:
        # Scale the local shard: the same factor on every rank keeps FSDP2's shards consistent.
        local = _local(grad)
        local.mul_(coef.to(local.device))


def zero_nonfinite_(named: list[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """Replace NaN/Inf gradient entries by zero; return {name: count} of the parameters touched.

    One host sync for all parameters (the counts travel together), not one per parameter."""
    if not named:
        return {}
    locals_ = [_local(grad) for _, _, grad in named]
    counts = torch.stack([(~torch.isfinite(local)).sum().to(locals_[0].device) for local in locals_]).tolist()
    touched = {}
    for (name, _, _), local, count in zip(named, locals_, counts):
        if count:
            local.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            touched[name] = int(count)
    return touched


class GradientMonitor:
    """Per-parameter gradient statistics and pathologies every ``config.grad_every`` steps."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.previous: dict[str, torch.Tensor] = {}

    @property
    def every(self) -> int:
        return self.config.grad_every

    def wants_previous(self, step: int) -> bool:
        """Keep this step's gradients for the flip-flop test of the next (reporting) step."""
        return self.every > 0 and (step + 1) % self.every == 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def remember(self, named: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        self.previous = {name: _local(grad).detach().float().clone() for name, _, grad in named}

    @torch.no_grad()
    def report(self, step: int, named: list[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Statistics and pathologies of the current gradients, as a JSON-able dict."""
        c = self.config
        params: dict[str, dict[str, Any]] = {}
        fired = 0
        for name, _, grad in named:
            g = _local(grad).detach().float()
            finite = torch.isfinite(g)
            nonfinite = int((~finite).sum())
            values = g[finite]
            stats: dict[str, Any] = {"nonfinite": nonfinite, "numel": g.numel()}
            if values.numel():
                stats.update(
                    mean=values.mean().item(),
                    std=values.std(unbiased=False).item(),
                    min=values.min().item(),
                    max=values.max().item(),
                )
            norm = torch.linalg.vector_norm(values).item() if values.numel() else 0.0
            zero_fraction = (g == 0).float().mean().item() if g.numel() else 1.0
            flags = []
            if zero_fraction > c.sparsity_threshold:
                flags.append("sparse")
            if norm < c.collapse_norm:
                flags.append("collapsed")
            previous = self.previous.get(name)
            if previous is not None and previous.shape == g.shape and nonfinite == 0:
                cosine = torch.nn.functional.cosine_similarity(
                    g.reshape(-1), previous.reshape(-1), dim=0
                ).item()
                stats["cosine_prev"] = cosine
                if math.isfinite(cosine) and cosine < c.flip_cosine:
                    flags.append("flip_flop")
            stats.update(norm=norm, zero_fraction=zero_fraction, flags=flags)
            fired += len(flags)
            params[name] = stats
        score = fired / (3 * len(params)) if params else 0.0
        flagged = {name: s["flags"] for name, s in params.items() if s["flags"]}
        alert = score > c.alert_score
        if alert:
            logger.warning(
                "gradient pathology alert at step %d: score %.2f, %s",
                step,
                score,
                ", ".join(f"{n} ({'/'.join(f)})" for n, f in list(flagged.items())[:10]),
            )
        self.previous = {}
        return {"step": step, "score": score, "alert": alert, "flagged": flagged, "params": params}
