"""Recovery tools: re-initialising stuck A entries, soft reset of parameters that stopped moving."""

from __future__ import annotations

import math

import torch

from ssmkit.training.config import OptimConfig, RecoveryConfig
from ssmkit.training.optim import build_optimizer
from ssmkit.training.recovery import (
    Recovery,
    find_stuck_A,
    find_stuck_parameters,
    parameter_values,
    reinit_A_,
    soft_reset_,
)
from tests.training.toy import ToyLM


def test_stuck_A_entries_are_found_and_reinitialised_with_their_moments():
    model = ToyLM(d_model=6)
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, 32, (1, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.A_log[1] = 50.0  # A = e^50: forgets at once
        model.A_log[4] = float("nan")
    found = find_stuck_A(model, a_min=1e-4, a_max=1e4)
    assert list(found) == ["A_log"] and found["A_log"].nonzero().flatten().tolist() == [1, 4]
    before = model.A_log.detach().clone()
    count = reinit_A_(
        model.A_log, found["A_log"], generator=torch.Generator().manual_seed(0), optimizer=optimizer
    )
    assert count == 2
    A = torch.exp(model.A_log.detach())
    assert torch.isfinite(A).all() and (A[[1, 4]] >= 1).all() and (A[[1, 4]] <= 16).all()
    keep = torch.tensor([0, 2, 3, 5])
    assert torch.equal(model.A_log.detach()[keep], before[keep])
    state = optimizer.state[model.A_log]
    assert state["exp_avg"][[1, 4]].eq(0).all() and state["exp_avg_sq"][[1, 4]].eq(0).all()


def test_two_dimensional_A_gets_s4d_real_rows():
    A_log = torch.nn.Parameter(torch.full((3, 4), 20.0))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1] = True
    reinit_A_(A_log, mask)
    assert torch.allclose(A_log.detach()[1], torch.log(torch.arange(1.0, 5.0)))
    assert A_log.detach()[0].eq(20.0).all()


def test_soft_reset_only_touches_stuck_parameters():
    model = ToyLM()
    before = parameter_values(model, ["A_log", "D", "dt_bias"])
    with torch.no_grad():
        model.A_log.add_(0.1)  # moved; D and dt_bias did not
    stuck = find_stuck_parameters(model, before, tol=1e-7)
    assert stuck == ["dt_bias", "D"] or sorted(stuck) == ["D", "dt_bias"]
    scale = soft_reset_(model.D, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    assert scale == 0.01  # D is constant (all ones): noise relative to 1
    assert not torch.equal(model.D.detach(), torch.ones_like(model.D))
    assert (model.D.detach() - 1).abs().max() < 0.1


def test_recovery_run_logs_events():
    model = ToyLM()
    recovery = Recovery(RecoveryConfig(every=5, patterns=["D", "A_log"]), seed=1)
    assert recovery.due(10) and not recovery.due(3)
    assert recovery.step(5, model) == []  # first call only records values
    with torch.no_grad():
        model.A_log.add_(0.5)
        model.A_log[0] = -math.inf
    events = recovery.step(10, model)
    assert {"event": "reinit_A", "param": "A_log", "entries": 1} in events
    assert [e["param"] for e in events if e["event"] == "soft_reset"] == ["D"]
