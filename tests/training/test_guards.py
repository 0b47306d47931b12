"""The guard alone (verdicts, windows, snapshots), then inside the trainer with real faults: a loss
that turns NaN, an Inf gradient, loss spikes. The run must complete, say what happened in its log,
and end with finite weights."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.training.config import GuardConfig, OptimConfig
from ssmkit.training.guards import Guard, TrainingDiverged, capture_snapshot, restore_snapshot
from ssmkit.training.metrics import LOG_FILE, read_log
from ssmkit.training.optim import build_optimizer
from ssmkit.training.trainer import Trainer
from tests.training.common import random_stream, small_config
from tests.training.toy import ToyLM


def test_verdicts():
    guard = Guard(GuardConfig(spike_warmup=3, spike_factor=3.0, max_bad_steps=2, window=10))
    assert guard.inspect(0, loss=2.0, grad_norm=1.0).ok
    v = guard.inspect(1, loss=float("nan"), grad_norm=1.0)
    assert not v.ok and v.reason == "nan_loss" and not v.rollback
    for _ in range(3):
        guard.record_good(2.0)
    assert guard.baseline == pytest.approx(2.0)
    assert guard.inspect(5, loss=5.9, grad_norm=1.0).ok  # below 3 x 2.0
    v = guard.inspect(6, loss=6.5, grad_norm=1.0)  # second bad step within the window
    assert v.reason == "loss_spike" and v.rollback and v.lr_factor == 0.5
    v = guard.inspect(7, loss=2.0, grad_norm=float("inf"), bad_params=["a.weight", "b.bias"])
    assert v.reason == "nonfinite_grad" and "a.weight, b.bias" in v.message and not v.rollback


def test_window_forgets_old_bad_steps():
    guard = Guard(GuardConfig(max_bad_steps=2, window=5))
    assert not guard.inspect(0, loss=math.nan, grad_norm=1.0).rollback
    assert not guard.inspect(10, loss=math.nan, grad_norm=1.0).rollback  # the first fell out of the window
    v = guard.inspect(12, loss=math.nan, grad_norm=1.0)
    assert v.rollback and v.lr_factor == 0.7


def test_snapshot_restore_is_exact_and_failed_snapshots_are_dropped():
    model = ToyLM()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    guard = Guard(GuardConfig(snapshots=5, max_rollbacks=3))

    def train_step():
        ids = torch.randint(0, 32, (2, 8))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    guard.add_snapshot(capture_snapshot(0, model, optimizer, {}))  # before any optimizer state exists
    train_step()
    guard.add_snapshot(capture_snapshot(1, model, optimizer, {}))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_avg = optimizer.state[model.proj.weight]["exp_avg"].clone()
    train_step()
    target = guard.rollback_target()
    assert target.step == 1
    restore_snapshot(target, model, optimizer)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert torch.equal(optimizer.state[model.proj.weight]["exp_avg"], saved_avg)
    # The continuation from step 1 failed again: the next rollback goes further back, to step 0.
    target = guard.rollback_target()
    assert target.step == 0
    restore_snapshot(target, model, optimizer)
    assert model.proj.weight not in optimizer.state
    guard.rollback_target()
    with pytest.raises(TrainingDiverged, match="3 rollbacks did not stop the bad steps"):
        guard.rollback_target()


def _run(tmp_path, faults, **overrides):
    config = small_config(tmp_path, max_steps=12, **overrides)
    model = ToyLM(faults=faults)
    result = Trainer(config, model=model, train_stream=random_stream()).fit()
    events = [r for r in read_log(tmp_path / LOG_FILE) if r["type"] == "event"]
    steps = [r for r in read_log(tmp_path / LOG_FILE) if r["type"] == "step"]
    assert result.step == 12 and steps[-1]["step"] == 11
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(steps[-1]["loss"])
    return events, steps, result


def test_nan_loss_at_step_k_is_skipped(tmp_path):
    events, steps, result = _run(tmp_path, {5: "nan"})
    skipped = [e for e in events if e["event"] == "skipped_step"]
    assert len(skipped) == 1 and skipped[0]["reason"] == "nan_loss" and skipped[0]["step"] == 5
    assert not [e for e in events if e["event"] == "rollback"]
    assert result.iterations == 13  # one extra iteration for the skipped step


def test_inf_gradient_names_the_parameter(tmp_path):
    events, _, _ = _run(tmp_path, {4: "inf_grad"})
    (skipped,) = [e for e in events if e["event"] == "skipped_step"]
    assert skipped["reason"] == "nonfinite_grad" and skipped["bad_params"] == ["proj.weight"]
    assert "proj.weight" in skipped["message"]


def test_repeated_nan_rolls_back_and_lowers_the_lr(tmp_path):
    events, steps, _ = _run(tmp_path, {6: "nan", 7: "nan", 8: "nan"}, guard__max_bad_steps=3)
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["reason"] == "nan_loss" and rollback["lr_factor"] == 0.7
    assert rollback["from_step"] == 6 and rollback["to_step"] == 6  # snapshot every 2 steps: step 6 is one
    assert rollback["lr_scale"] == pytest.approx(0.7)
    # After the rollback the schedule runs at 0.7 of its value.
    after = [r for r in steps if r["iter"] > rollback["iter"]]
    assert after[0]["lr"] < steps[5]["lr"]


def test_loss_spikes_roll_back_with_half_the_lr(tmp_path):
    events, _, _ = _run(tmp_path, {7: "spike", 8: "spike"}, guard__max_bad_steps=2)
    spikes = [e for e in events if e["event"] == "skipped_step"]
    assert [e["reason"] for e in spikes] == ["loss_spike", "loss_spike"]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["lr_factor"] == 0.5 and rollback["reason"] == "loss_spike"


def test_zeroing_nonfinite_gradients_lets_the_step_through(tmp_path):
    events, _, _ = _run(tmp_path, {4: "inf_grad"}, monitor__zero_nonfinite_grads=True)
    (zeroed,) = [e for e in events if e["event"] == "zeroed_nonfinite_grads"]
    assert zeroed["params"] == {"proj.weight": 16 * 16}
    assert not [e for e in events if e["event"] == "skipped_step"]
