"""Parameter groups: no decay on biases, norms, A_log, D, dt_bias, tied embeddings; lr multipliers."""

from __future__ import annotations

import pytest
import torch

from ssmkit.training.config import OptimConfig
from ssmkit.training.optim import build_optimizer, plan_groups
from tests.training.toy import ToyLM


def _groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def test_no_decay_rules_on_an_untied_model():
    model = ToyLM()
    groups = _groups(build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1)))
    assert set(groups) == {"default", "default_no_decay"}
    assert set(groups["default"]["param_names"]) == {"embedding.weight", "proj.weight", "head.weight"}
    assert set(groups["default_no_decay"]["param_names"]) == {
        "A_log",
        "D",
        "dt_bias",
        "proj.bias",
        "norm.weight",
        "norm.bias",
    }
    assert groups["default"]["weight_decay"] == 0.1 and groups["default_no_decay"]["weight_decay"] == 0.0


def test_tied_embedding_gets_no_decay():
    model = ToyLM()
    model.head.weight = model.embedding.weight  # tie: one parameter, two names
    groups = _groups(build_optimizer(model, OptimConfig()))
    assert "embedding.weight" in groups["default_no_decay"]["param_names"]


def test_ssmkit_model_names():
    models = pytest.importorskip("ssmkit.models")
    model = models.LanguageModel(models.get_preset("tiny-mamba2"))  # tied embeddings
    plans = {p.name: p for p in plan_groups(model, OptimConfig())}
    exempt = set(plans["default_no_decay"].names)
    for i in range(model.config.n_layer):
        for leaf in ("A_log", "D", "dt_bias", "conv1d.bias", "norm.weight"):
            assert f"layers.{i}.mixer.{leaf}" in exempt
        assert f"layers.{i}.norm.weight" in exempt
        assert f"layers.{i}.mixer.in_proj.weight" in plans["default"].names
    assert "embedding.weight" in exempt and "norm_f.weight" in exempt


def test_groups_with_lr_multipliers_and_weight_decay():
    config = OptimConfig(
        lr=2e-3,
        weight_decay=0.1,
        groups=[
            {
                "name": "ssm",
                "params": ["A_log", "D", "dt_bias", "proj.*"],
                "lr_mult": 0.5,
                "weight_decay": 0.05,
            },
            {"name": "memory", "params": ["head.*"], "lr_mult": 0.3, "weight_decay": 0.01},
        ],
    )
    groups = _groups(build_optimizer(ToyLM(), config))
    assert groups["ssm"]["param_names"] == ["proj.weight"] and groups["ssm"]["lr"] == pytest.approx(1e-3)
    assert groups["ssm"]["weight_decay"] == 0.05
    assert set(groups["ssm_no_decay"]["param_names"]) == {"A_log", "dt_bias", "D", "proj.bias"}
    assert groups["ssm_no_decay"]["weight_decay"] == 0.0 and groups["ssm_no_decay"]["lr"] == pytest.approx(
        1e-3
    )
    assert groups["memory"]["lr"] == pytest.approx(6e-4) and groups["memory"]["weight_decay"] == 0.01
    assert groups["default"]["param_names"] == ["embedding.weight"]
    # Every trainable parameter is in exactly one group.
    names = [n for g in groups.values() for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in ToyLM().named_parameters())


def test_group_errors_and_unmatched_warning(caplog):
    with pytest.raises(ValueError, match=r"optim.groups\[0\].params must be a non-empty list"):
        build_optimizer(ToyLM(), OptimConfig(groups=[{"name": "x"}]))
    with pytest.raises(ValueError, match=r"optim.groups\[0\] has unknown keys \['lr'\]"):
        build_optimizer(ToyLM(), OptimConfig(groups=[{"params": ["*"], "lr": 1.0}]))
    build_optimizer(ToyLM(), OptimConfig(groups=[{"name": "memory", "params": ["*.memory.*"]}]))
    assert "matched no parameter" in caplog.text


def test_frozen_parameters_are_left_out():
    model = ToyLM()
    model.embedding.weight.requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig())
    assert all(p is not model.embedding.weight for g in optimizer.param_groups for p in g["params"])
    assert isinstance(optimizer, torch.optim.AdamW)
