"""AdamW with parameter groups chosen by parameter name.

Each configured group (``{name, params: [patterns], lr_mult, weight_decay}``) takes the parameters
whose names match one of its fnmatch patterns, first group first; the rest form the ``default``
group. Inside each group, parameters matching ``no_decay`` (and the embedding when it is tied to
the output head) are split off with weight decay 0. Every torch param group carries its
``name``, ``lr_mult`` and ``base_lr`` so that the schedule sets ``lr = base_lr * factor`` and the
log can say which group got which rate.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ssmkit.training.config import OptimConfig

logger = logging.getLogger(__name__)


@dataclass
class GroupPlan:
    """One torch param group: its parameters by name and its hyperparameters."""

    name: str
    names: list[str]
    lr_mult: float
    weight_decay: float


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the input embedding is also the output head: the model's config says so
    (``tie_embeddings``), or a parameter is registered under two names."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_embeddings", False):
        return True
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            return True
        seen[id(param)] = name
    return False


def plan_groups(model: nn.Module, config: OptimConfig) -> list[GroupPlan]:
    """Split the trainable parameters of ``model`` into groups (see the module docstring)."""
    no_decay = list(config.no_decay)
    if embeddings_tied(model):
        # A tied embedding is the output head too: decaying it pulls every logit towards zero.
        no_decay += ["*embedding*", "*embed*"]
    specs = []
    for i, group in enumerate(config.groups):
        unknown = sorted(set(group) - {"name", "params", "lr_mult", "weight_decay"})
        if unknown:
            raise ValueError(
                f"optim.groups[{i}] has unknown keys {unknown}; known: name, params, lr_mult, weight_decay"
            )
        patterns = group.get("params")
        if not patterns or not isinstance(patterns, list):
            raise ValueError(
                f"optim.groups[{i}].params must be a non-empty list of name patterns, got {patterns!r}"
            )
        specs.append(
            (
                str(group.get("name", f"group{i}")),
                patterns,
                float(group.get("lr_mult", 1.0)),
                float(group.get("weight_decay", config.weight_decay)),
            )
        )
    specs.append(("default", ["*"], 1.0, config.weight_decay))

    members: dict[tuple[str, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        spec = next(s for s in specs if _matches(name, s[1]))
        members.setdefault((spec[0], _matches(name, no_decay)), []).append(name)

    plans = []
    for group_name, _, lr_mult, weight_decay in specs:
        for exempt in (False, True):
            names = members.get((group_name, exempt))
            if names:
                suffix = "_no_decay" if exempt else ""
                plans.append(GroupPlan(group_name + suffix, names, lr_mult, 0.0 if exempt else weight_decay))
    for group_name, patterns, _, _ in specs[:-1]:
        if not any(key[0] == group_name for key in members):
            logger.warning("optimizer group %r matched no parameter (patterns %s)", group_name, patterns)
    return plans


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`plan_groups`; ``lr`` of each group is ``config.lr * lr_mult``."""
    params = dict(model.named_parameters())
    groups = []
    for plan in plan_groups(model, config):
        base_lr = config.lr * plan.lr_mult
        groups.append(
            {
                "params": [params[n] for n in plan.names],
                "param_names": plan.names,
                "name": plan.name,
                "lr": base_lr,
                "base_lr": base_lr,
                "lr_mult": plan.lr_mult,
                "weight_decay": plan.weight_decay,
            }
        )
        logger.info(
            "optimizer group %-20s %4d tensors %10d values lr x%.3g weight decay %.3g",
            plan.name,
            len(plan.names),
            sum(params[n].numel() for n in plan.names),
            plan.lr_mult,
            plan.weight_decay,
        )
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, foreach=config.foreach
    )
