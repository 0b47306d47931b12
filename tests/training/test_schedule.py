"""Warmup then cosine (or linear) decay to a floor; the guard's scale multiplies it."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.training.config import ScheduleConfig
from ssmkit.training.schedule import LRSchedule, lr_factor


def test_warmup_then_cosine_to_floor():
    f = [lr_factor(s, total_steps=110, warmup_steps=10, decay="cosine", min_ratio=0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # increasing warmup
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # non-increasing decay
    assert f[-1] == pytest.approx(0.1)
    mid = 10 + 99 // 2
    assert f[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 99)))


def test_linear_and_constant():
    assert lr_factor(59, total_steps=60, warmup_steps=0, decay="linear", min_ratio=0.2) == pytest.approx(0.2)
    assert lr_factor(30, total_steps=60, warmup_steps=5, decay="constant", min_ratio=0.2) == 1.0
    with pytest.raises(ValueError, match="decay must be"):
        lr_factor(10, total_steps=60, warmup_steps=5, decay="step", min_ratio=0.2)


def test_schedule_sets_every_group_and_keeps_multipliers():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 5e-4}])
    schedule = LRSchedule(optimizer, ScheduleConfig(warmup_steps=4, min_lr_ratio=0.1), total_steps=20)
    peak = schedule.apply(3)
    assert peak == pytest.approx(1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 5e-4])
    schedule.scale = 0.7
    schedule.apply(19)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.07e-3, 0.035e-3])
    restored = LRSchedule(optimizer, ScheduleConfig(), total_steps=20)
    restored.load_state_dict(schedule.state_dict())
    assert restored.scale == 0.7
