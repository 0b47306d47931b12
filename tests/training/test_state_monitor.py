"""SSM state norms per layer through the inference cache, the warning bound, NaN, and the penalty."""

from __future__ import annotations

import pytest
import torch

from ssmkit.training.config import MonitorConfig
from ssmkit.training.state_monitor import StateMonitor, state_penalty, unit_norms
from tests.training.toy import ToyLM

models = pytest.importorskip("ssmkit.models", reason="ssmkit.models does not import yet")


def _tiny(kind="tiny-mamba2"):
    torch.manual_seed(0)
    return models.LanguageModel(models.get_preset(kind))


def test_norms_per_layer_match_the_cache():
    model = _tiny()
    ids = torch.randint(0, 101, (2, 24))
    report = StateMonitor(MonitorConfig(state_every=1)).measure(model, ids)
    assert sorted(report["layers"]) == [0, 1] and not report["warnings"] and not report["nonfinite"]
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(ids, cache=cache)
    norms = cache.states[1].ssm.float().flatten(2).norm(dim=-1)  # (batch, heads)
    assert report["layers"][1]["mean"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert report["layers"][1]["max"] == pytest.approx(norms.max().item(), rel=1e-6)


def test_attention_layers_are_skipped_and_warning_bound(caplog):
    model = _tiny("tiny-hybrid")
    monitor = StateMonitor(MonitorConfig(state_every=1, state_warn=1e-6))
    report = monitor.measure(model, torch.randint(0, 101, (1, 16)))
    assert sorted(report["layers"]) == [0, 2]
    assert report["warnings"] == [0, 2] and "exceeds" in caplog.text


def test_nonfinite_state_is_an_error(caplog):
    model = _tiny()
    with torch.no_grad():
        model.layers[1].mixer.dt_bias.fill_(float("nan"))
    report = StateMonitor(MonitorConfig(state_every=1)).measure(model, torch.randint(0, 101, (1, 16)))
    assert report["nonfinite"] == [1]
    assert any(
        r.levelname == "ERROR" and "layer 1 has a non-finite SSM state" in r.message for r in caplog.records
    )


def test_penalty_is_zero_below_target_and_differentiable_above():
    model = ToyLM()
    ids = torch.randint(0, 32, (2, 12))
    cache = model.allocate_cache(2)
    out = model(ids, labels=ids, cache=cache)
    assert state_penalty(cache, target=1e6).item() == 0.0
    norms = unit_norms(cache.states[0].ssm)
    target = norms.median().item()
    penalty = state_penalty(cache, target=target)
    torch.testing.assert_close(penalty, torch.relu(norms - target).pow(2).mean())
    assert penalty.item() > 0
    (out.loss + penalty).backward()
    assert model.A_log.grad is not None and model.A_log.grad.abs().sum() > 0


def test_penalty_through_a_tiny_mamba2_cache():
    model = _tiny()
    ids = torch.randint(0, 101, (2, 24))
    cache = model.allocate_cache(2)
    out = model(ids, labels=ids, cache=cache)
    (out.loss + state_penalty(cache, target=0.0)).backward()
    assert model.layers[0].mixer.A_log.grad is not None


def test_trainer_with_state_penalty_and_monitor(tmp_path):
    from ssmkit.training.metrics import LOG_FILE, read_log
    from ssmkit.training.trainer import Trainer
    from tests.training.common import random_stream, small_config

    config = small_config(
        tmp_path,
        max_steps=4,
        data__packing=False,
        monitor__state_penalty=0.5,
        monitor__state_target=0.01,
        monitor__state_every=2,
    )
    Trainer(config, model=ToyLM(), train_stream=random_stream()).fit()
    records = read_log(tmp_path / LOG_FILE)
    steps = [r for r in records if r["type"] == "step"]
    assert all(r["state_penalty"] > 0 for r in steps)
    assert [r["step"] for r in records if r["type"] == "state"] == [2, 4]


def test_model_without_cache_is_reported_once(caplog):
    model = torch.nn.Linear(2, 2)  # no allocate_cache()
    monitor = StateMonitor(MonitorConfig(state_every=1))
    assert monitor.measure(model, torch.randint(0, 32, (1, 8))) is None
    assert monitor.measure(model, torch.randint(0, 32, (1, 8))) is None
    assert caplog.text.count("has no allocate_cache") == 1
