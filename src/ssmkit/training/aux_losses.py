"""Auxiliary losses added to the language-model loss, and modules that follow the optimizer step.

Terms. Every module of the model with an ``auxiliary_losses(target_norm=...)`` method reports named
0-dim tensors computed from its last forward call (GroundedMamba's mixers report ``state_norm``,
``(mean SSM state norm - target)^2``, and ``memory_consistency``); the model output adds
``output_consistency`` (:func:`output_consistency`). A term reported by several modules (one per
layer) is combined by ``reduction`` ("mean" or "sum"). The objective is
``loss + sum over names of weight * term`` with the weights of :class:`AuxConfig`; every term,
weighted or not, is also returned detached for the log.

A weight of 0 leaves its term out of the graph, and when every weight is 0 the trainer does not
use this component at all, so such a run is bit-identical to one without an ``aux`` section.

Step-aware modules (a ``set_training_step(step)`` method; GroundedMamba's gate schedule and
memory-write cadence) count their own forward calls. :func:`set_training_step` sets them all to the
trainer's optimizer step before each micro-batch, so that gradient accumulation, monitoring probes
and rollbacks do not shift the schedule away from the optimizer's step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ssmkit.training.config import AuxConfig

logger = logging.getLogger(__name__)

OUTPUT_CONSISTENCY = "output_consistency"


def output_consistency(logits: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L2 norm of the change of the logits between neighbouring positions.

    logits: (batch, seqlen, vocab)   cu_seqlens: (num_seqs + 1,) int boundaries of sequences packed
    into a batch of one, or None.
    Returns a 0-dim tensor, ``mean_t ||logits[:, t + 1] - logits[:, t]||_2``, in fp32 (fp64 stays
    fp64). With cu_seqlens, pairs that straddle two packed sequences are left out: the jump there is
    between unrelated documents. 0 (still attached to ``logits``) when no pair is left.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, seqlen, vocab), got {tuple(logits.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    # vector_norm's gradient is 0 (not NaN) where two neighbouring rows of logits are equal.
    norms = torch.linalg.vector_norm(logits[:, 1:] - logits[:, :-1], dim=-1)  # (batch, seqlen - 1)
    if cu_seqlens is None:
        return norms.mean() if norms.numel() else norms.sum()
    seqlen = logits.shape[1]
    if logits.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs logits of batch 1 (packed sequences), got {tuple(logits.shape)}")
    positions = torch.arange(seqlen, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq_idx = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    same = (seq_idx[1:] == seq_idx[:-1]).to(norms.device)  # (seqlen - 1,)
    kept = same.sum()
    return (norms[0] * same.to(dtype)).sum() / kept.clamp(min=1).to(dtype)


def providers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of ``model`` with an ``auxiliary_losses`` method."""
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "auxiliary_losses", None))]


def step_aware_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` with a ``set_training_step(step)`` method."""
    return [m for m in model.modules() if callable(getattr(m, "set_training_step", None))]


def set_training_step(modules: list[nn.Module], step: int) -> None:
    """Tell each step-aware module the optimizer step (see the module docstring)."""
    for module in modules:
        module.set_training_step(step)


class AuxiliaryLosses:
    """The auxiliary terms of one model under one :class:`AuxConfig`.

    Call :meth:`compute` right after the forward call whose terms it should read (the modules keep
    only their last call's values).
    """

    def __init__(self, config: AuxConfig, model: nn.Module) -> None:
        self.config = config
        self.weights = config.weights()
        self.providers = providers(model)
        self._checked = False

    @property
    def enabled(self) -> bool:
        """Whether any weight is positive; when not, the trainer never calls :meth:`compute`."""
        return any(w > 0 for w in self.weights.values())

    def compute(
        self, logits: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The terms of the last forward call.

        logits: (batch, seqlen, vocab) of that call; cu_seqlens: (num_seqs + 1,) or None.
        Returns (``sum(weight * term)`` over the positive weights: a 0-dim fp32 tensor, fp64 when
        the terms are, attached to the graph; {name: unweighted term, detached}, sorted by name).
        """
        reported: dict[str, list[torch.Tensor]] = {}
        for name, module in self.providers:
            for term, value in module.auxiliary_losses(target_norm=self.config.state_target).items():
                if term == OUTPUT_CONSISTENCY:
                    raise ValueError(
                        f"{name} reports a term named {term!r}, a name kept for the model output's"
                    )
                if value is not None:
                    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
                    reported.setdefault(term, []).append(value.to(dtype))
        terms = {}
        for term, values in reported.items():
            total = torch.stack([v.to(values[0]) for v in values]).sum()
            terms[term] = total / len(values) if self.config.reduction == "mean" else total
        if self.weights.get(OUTPUT_CONSISTENCY, 0.0) > 0:
            terms[OUTPUT_CONSISTENCY] = output_consistency(logits, cu_seqlens)
        else:
            # Still logged, without a graph: no second logits-sized tensor kept for backward.
            with torch.no_grad():
                terms[OUTPUT_CONSISTENCY] = output_consistency(logits, cu_seqlens)
        if not self._checked:
            self._checked = True
            missing = sorted(n for n, w in self.weights.items() if w > 0 and n not in terms)
            if missing:
                # A protocol config on a model without grounded layers: say so once, do not fail.
                logger.warning(
                    "auxiliary losses %s have a weight but no module of the model reports them "
                    "(modules with auxiliary_losses(): %s)",
                    missing,
                    [n for n, _ in self.providers] or "none",
                )
        weighted = [self.weights[n] * t for n, t in terms.items() if self.weights.get(n, 0.0) > 0]
        if weighted:
            extra = torch.stack([w.to(weighted[0]) for w in weighted]).sum()
        else:
            extra = torch.zeros((), device=logits.device)
        return extra, {n: t.detach() for n, t in sorted(terms.items())}


__all__ = [
    "AuxiliaryLosses",
    "output_consistency",
    "providers",
    "set_training_step",
    "step_aware_modules",
]
