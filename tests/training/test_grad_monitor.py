"""Gradient norms, clipping, statistics and the pathology detector."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit.training.config import MonitorConfig
from ssmkit.training.grad_monitor import GradientMonitor, clip_gradients, gradient_norms, zero_nonfinite_


def _named(**grads):
    out = []
    for name, grad in grads.items():
        param = torch.nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        out.append((name, param, param.grad))
    return out


def test_norms_and_clipping_match_torch():
    grads = [torch.randn(5, 3), torch.randn(7)]
    per_param, total = gradient_norms(grads)
    assert torch.allclose(per_param, torch.stack([g.norm() for g in grads]))
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    expected_total = torch.nn.utils.clip_grad_norm_(params, 0.5)
    clip_gradients(grads, total, 0.5)
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad)


def test_per_tensor_path_matches_the_multi_tensor_path():
    """fp32 gradients on one device take the foreach kernels; any other mix (here one fp64 tensor)
    the per-tensor loop: the same norms and the same clipped gradients either way."""
    grads = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2)]
    mixed = [g.double() if i == 1 else g.clone() for i, g in enumerate(grads)]
    per_param, total = gradient_norms(grads)
    per_param_mixed, total_mixed = gradient_norms(mixed)
    torch.testing.assert_close(per_param, per_param_mixed)
    torch.testing.assert_close(total, total_mixed)
    clip_gradients(grads, total, 0.5)
    clip_gradients(mixed, total_mixed, 0.5)
    for g, m in zip(grads, mixed):
        torch.testing.assert_close(g, m.float())
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(
        0.5, rel=1e-5
    )


def test_nonfinite_norm_points_at_the_parameter():
    per_param, total = gradient_norms([torch.ones(3), torch.tensor([1.0, float("inf")]), torch.ones(2)])
    assert not math.isfinite(total.item())
    assert [math.isfinite(v) for v in per_param.tolist()] == [True, False, True]


def test_zero_nonfinite():
    named = _named(a=torch.tensor([1.0, float("nan"), float("inf")]), b=torch.ones(2))
    assert zero_nonfinite_(named) == {"a": 2}
    assert named[0][2].tolist() == [1.0, 0.0, 0.0]


def test_statistics_and_each_pathology():
    monitor = GradientMonitor(MonitorConfig(grad_every=2, alert_score=0.25))
    assert monitor.due(0) and monitor.due(4) and not monitor.due(3)
    assert monitor.wants_previous(1) and not monitor.wants_previous(2)
    direction = torch.randn(50)
    previous = _named(
        healthy=direction.clone(), flip=direction.clone(), sparse=torch.randn(50), dead=torch.randn(50)
    )
    monitor.remember(previous)
    sparse = torch.zeros(50)
    sparse[:2] = 1.0
    current = _named(
        healthy=direction + 0.1 * torch.randn(50),
        flip=-direction,
        sparse=sparse,
        dead=torch.full((50,), 1e-10),
    )
    report = monitor.report(2, current)
    flags = {name: stats["flags"] for name, stats in report["params"].items()}
    assert flags == {"healthy": [], "flip": ["flip_flop"], "sparse": ["sparse"], "dead": ["collapsed"]}
    stats = report["params"]["healthy"]
    g = current[0][2]
    assert stats["mean"] == pytest.approx(g.mean().item()) and stats["max"] == pytest.approx(g.max().item())
    assert stats["std"] == pytest.approx(g.std(unbiased=False).item(), rel=1e-5) and stats["nonfinite"] == 0
    assert report["score"] == pytest.approx(3 / 12) and not report["alert"]
    assert monitor.previous == {}  # the previous gradients are only kept for one report


def test_alert_and_nan_counts(caplog):
    monitor = GradientMonitor(MonitorConfig(grad_every=1, alert_score=0.2))
    report = monitor.report(0, _named(a=torch.zeros(10), b=torch.tensor([float("nan"), 0.0, 0.0])))
    assert report["params"]["b"]["nonfinite"] == 1
    assert report["alert"] and "gradient pathology alert at step 0" in caplog.text
