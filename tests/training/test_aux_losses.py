"""Auxiliary losses and the GroundedMamba training protocol: the output-consistency term, the
collector alone (weights, reduction, warnings, config checks), then in the trainer with
tiny-grounded: the objective's gradient, bit-identical training at weight 0, logged terms, the
protocol's optimizer groups, set_training_step following optimizer steps, and a short run of
configs/train/grounded-minimal.yaml shrunk to test sizes."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ssmkit.training.aux_losses import (
    AuxiliaryLosses,
    output_consistency,
    providers,
    set_training_step,
    step_aware_modules,
)
from ssmkit.training.config import AuxConfig, TrainConfig, load_config
from ssmkit.training.metrics import LOG_FILE, read_log
from ssmkit.training.optim import build_optimizer
from ssmkit.training.trainer import Trainer
from tests.helpers import assert_close, rel_err
from tests.training.common import random_stream, small_config

models = pytest.importorskip("ssmkit.models", reason="ssmkit.models does not import yet")

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = ROOT / "configs" / "train" / "grounded-minimal.yaml"
PROTOCOL_AUX = {"state_norm": 0.1, "memory_consistency": 0.05, "output_consistency": 0.01}


def _tiny_grounded(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.LanguageModel(models.get_preset("tiny-grounded"))


def _mixers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "GroundedMixer"]


def _steps(out_dir: Path) -> list[dict]:
    return [r for r in read_log(out_dir / LOG_FILE) if r["type"] == "step"]


# ---------------------------------------------------------------- output consistency
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_output_consistency_matches_its_definition(dtype):
    logits = torch.randn(3, 11, 37, dtype=torch.float64)
    expected = torch.stack(
        [(logits[b, t + 1] - logits[b, t]).norm() for b in range(3) for t in range(10)]
    ).mean()
    got = output_consistency(logits.to(dtype))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, expected, dtype, name="output_consistency")


def test_output_consistency_leaves_out_pairs_across_packed_sequences():
    """Packed (batch 1, cu_seqlens): the mean over the pairs inside each sequence, as if the
    sequences were given one by one and their pairs pooled."""
    lengths = [4, 1, 6, 2]
    parts = [torch.randn(1, n, 13, dtype=torch.float64) for n in lengths]
    cu_seqlens = torch.tensor([0, 4, 5, 11, 13], dtype=torch.int32)
    packed = torch.cat(parts, dim=1)
    pairs = torch.cat([(p[0, 1:] - p[0, :-1]).norm(dim=-1) for p in parts])
    assert pairs.numel() == sum(n - 1 for n in lengths)
    assert_close(output_consistency(packed, cu_seqlens), pairs.mean(), torch.float64)
    # Without the boundaries the jumps between documents are counted and the value differs.
    assert rel_err(output_consistency(packed), pairs.mean()) > 1e-3
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, seqlen, vocab\)"):
        output_consistency(packed[0], cu_seqlens)


def test_output_consistency_gradient_is_finite_at_equal_neighbours():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    logits[:, 2] = logits[:, 1]  # a repeated row: a zero difference
    logits.requires_grad_(True)
    output_consistency(logits).backward()
    assert torch.isfinite(logits.grad).all()
    # fp64 gradient check away from the kink.
    smooth = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(output_consistency, (smooth,))


# ---------------------------------------------------------------- the collector alone
class _Reporter(nn.Module):
    """Reports fixed terms through a parameter, the way a grounded mixer does after a forward."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(scale, dtype=torch.float64))
        self.targets: list[float] = []

    def auxiliary_losses(self, target_norm: float = 5.0) -> dict[str, torch.Tensor]:
        self.targets.append(target_norm)
        return {
            "state_norm": (self.w - target_norm) ** 2,
            "memory_consistency": self.w * 3.0,
            "extra": self.w,
        }


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _Reporter(1.5), _Reporter(-2.0)
        self.plain = nn.Linear(3, 3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_collector_weights_and_reduction(reduction):
    model = _Stack()
    config = AuxConfig(state_norm=0.1, memory_consistency=0.0, output_consistency=0.01, state_target=4.0)
    config.terms = {"extra": "2e-1"}  # as PyYAML reads 2e-1
    config.reduction = reduction
    aux = AuxiliaryLosses(config, model)
    assert [n for n, _ in providers(model)] == ["a", "b"] and aux.enabled
    logits = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    extra, terms = aux.compute(logits)

    assert model.a.targets == [4.0] and model.b.targets == [4.0]
    combine = (lambda x, y: (x + y) / 2) if reduction == "mean" else (lambda x, y: x + y)
    a, b = model.a.w.detach(), model.b.w.detach()
    expected = {
        "state_norm": combine((a - 4) ** 2, (b - 4) ** 2),
        "memory_consistency": combine(3 * a, 3 * b),
        "extra": combine(a, b),
        "output_consistency": output_consistency(logits.detach()),
    }
    assert list(terms) == sorted(expected)
    for name, value in expected.items():
        assert not terms[name].requires_grad
        assert_close(terms[name], value, torch.float64, name=name)
    # memory_consistency has weight 0: in the log, not in the objective.
    weighted = 0.1 * expected["state_norm"] + 0.01 * expected["output_consistency"] + 0.2 * expected["extra"]
    assert_close(extra.detach(), weighted, torch.float64, name="objective term")
    extra.backward()
    k = 0.5 if reduction == "mean" else 1.0
    assert_close(model.a.w.grad, k * (0.1 * 2 * (a - 4) + 0.2), torch.float64, name="grad a")
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_collector_without_output_weight_keeps_logits_out_of_the_graph(caplog):
    aux = AuxiliaryLosses(AuxConfig(state_norm=1.0, terms={"absent": 0.5}), _Stack())
    logits = torch.randn(1, 4, 3, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="ssmkit.training.aux_losses"):
        extra, terms = aux.compute(logits)
        aux.compute(logits)
    assert "output_consistency" in terms  # logged at weight 0
    extra.backward()
    assert logits.grad is None
    warnings = [r for r in caplog.records if "absent" in r.getMessage()]
    assert len(warnings) == 1  # once, not per call


def test_collector_rejects_a_module_term_named_like_the_output_term():
    class Clash(nn.Module):
        def auxiliary_losses(self, target_norm: float = 5.0) -> dict[str, torch.Tensor]:
            return {"output_consistency": torch.zeros(())}

    aux = AuxiliaryLosses(AuxConfig(output_consistency=1.0), nn.Sequential(Clash()))
    with pytest.raises(ValueError, match="0 reports a term named 'output_consistency'"):
        aux.compute(torch.zeros(1, 3, 2))


def test_aux_config_checks():
    VALID = {"data": {"kind": "random"}}  # noqa: N806 (a constant of this test)
    assert not AuxConfig().enabled and AuxConfig(output_consistency=0.01).enabled
    with pytest.raises(ValueError, match="aux weight 'state_norm' must be a finite number >= 0, got -0.1"):
        TrainConfig.from_dict({**VALID, "aux": {"state_norm": -0.1}})
    with pytest.raises(ValueError, match=r"aux.reduction must be one of \('mean', 'sum'\), got 'max'"):
        TrainConfig.from_dict({**VALID, "aux": {"reduction": "max"}})
    with pytest.raises(ValueError, match="aux.terms.foo must be a number, got 'x'"):
        TrainConfig.from_dict({**VALID, "aux": {"terms": {"foo": "x"}}})
    with pytest.raises(ValueError, match="aux.terms.state_norm: set aux.state_norm instead"):
        TrainConfig.from_dict({**VALID, "aux": {"terms": {"state_norm": 1.0}}})
    with pytest.raises(ValueError, match=r"unknown config keys \['aux.weight'\]"):
        TrainConfig.from_dict({**VALID, "aux": {"weight": 1.0}})
    loaded = TrainConfig.from_dict({**VALID, "aux": {"state_norm": "1e-1", "terms": {"x": "2e-2"}}})
    assert loaded.aux.state_norm == 0.1 and loaded.aux.weights()["x"] == 0.02


def test_set_training_step_reaches_every_step_aware_module():
    model = _tiny_grounded()
    modules = step_aware_modules(model)
    assert modules == _mixers(model) and len(modules) == 2
    set_training_step(modules, 7)
    for mixer in modules:
        assert int(mixer.step) == 7 and int(mixer.memory.step) == 7


# ---------------------------------------------------------------- in the trainer (tiny-grounded)
def _grounded_trainer(out_dir: Path, *, model: nn.Module | None = None, **overrides) -> Trainer:
    overrides.setdefault("model", {"preset": "tiny-grounded"})
    # Unpacked rows, as in the protocol's configs (packed batches are covered by the unit tests).
    overrides.setdefault("data__packing", False)
    config = small_config(out_dir, **overrides)
    return Trainer(config, model=model or _tiny_grounded(), train_stream=random_stream(vocab_size=101))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trainer_objective_is_loss_plus_weighted_terms(tmp_path):
    """The gradient of one trainer micro-batch equals autograd of loss + sum(w * term) written out
    by hand on a copy of the model; with weights 0 it is the loss gradient alone, which differs."""
    model = _tiny_grounded()
    manual = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    trainer = _grounded_trainer(
        tmp_path / "aux", model=model, **{f"aux__{k}": v for k, v in PROTOCOL_AUX.items()}
    )
    batches = trainer.loader.next_step()
    loss, _, logged = trainer._forward_backward(batches)
    got = _grads(trainer.inner)

    plain = _grounded_trainer(tmp_path / "plain", model=plain_model)
    plain_loss, _, plain_logged = plain._forward_backward(plain.loader.next_step())
    assert plain_logged == {} and plain_loss == pytest.approx(loss, rel=1e-6)
    plain_grads = _grads(plain.inner)

    # By hand: the same step counters (the trainer sets them to its step, 0), one forward.
    set_training_step(step_aware_modules(manual), 0)
    batch = batches[0]
    out = manual(batch.input_ids, labels=batch.labels)
    terms = [m.auxiliary_losses(target_norm=5.0) for m in _mixers(manual)]
    state_norm = sum(t["state_norm"] for t in terms) / len(terms)
    memory_consistency = sum(t["memory_consistency"] for t in terms) / len(terms)
    diffs = out.logits[:, 1:] - out.logits[:, :-1]
    consistency = diffs.norm(dim=-1).mean()
    objective = out.loss + 0.1 * state_norm + 0.05 * memory_consistency + 0.01 * consistency
    objective.backward()
    expected = _grads(manual)

    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], torch.float32, scale=10.0, name=name)
    assert logged["aux_loss"] == pytest.approx(
        0.1 * state_norm.item() + 0.05 * memory_consistency.item() + 0.01 * consistency.item(), rel=1e-5
    )
    assert logged["state_norm"] == pytest.approx(state_norm.item(), rel=1e-5)
    # The terms change the gradient: the SSM's transition and norm, the memory path, the embedding.
    # (Not the memory's query yet: the bank's values start at zero, so until the first write the
    # read, and memory_consistency with it, does not depend on the query.)
    for name in (
        "layers.0.mixer.ssm.A_raw",
        "layers.1.mixer.ssm.norm.weight",
        "layers.0.mixer.memory.value.weight",
        "embedding.weight",
    ):
        assert rel_err(got[name], plain_grads[name]) > 1e-3, name


def test_weight_zero_trains_bit_identically_and_terms_are_logged(tmp_path):
    """Three runs of 3 steps from the same weights: no aux section; explicit zero weights; and the
    collector switched on by a weight on a term nobody reports (so every term is computed and
    logged, all at weight 0). The losses and final weights agree bit for bit."""
    base = dict(max_steps=3, monitor__state_every=2)
    runs = {
        "none": {},
        "zeros": {"aux": AuxConfig(state_norm=0.0, memory_consistency=0.0, output_consistency=0.0)},
        "logged": {"aux": AuxConfig(terms={"not_reported": 1.0})},
    }
    trainers = {}
    for name, extra in runs.items():
        trainers[name] = _grounded_trainer(tmp_path / name, **base, **extra)
        trainers[name].fit()
    losses = {name: [r["loss"] for r in _steps(tmp_path / name)] for name in runs}
    assert len(losses["none"]) == 3 and all(math.isfinite(v) for v in losses["none"])
    assert losses["zeros"] == losses["none"] and losses["logged"] == losses["none"]
    reference = trainers["none"].inner.state_dict()
    for name in ("zeros", "logged"):
        for key, value in trainers[name].inner.state_dict().items():
            assert torch.equal(value, reference[key]), (name, key)
    assert not any(k.startswith("aux") for k in _steps(tmp_path / "none")[0])
    for record in _steps(tmp_path / "logged"):
        for key in ("aux_state_norm", "aux_memory_consistency", "aux_output_consistency"):
            assert math.isfinite(record[key]) and record[key] >= 0, key
        assert record["aux_loss"] == 0.0


def test_protocol_weights_are_logged_every_step_and_change_training(tmp_path):
    aux = {f"aux__{k}": v for k, v in PROTOCOL_AUX.items()}
    with_aux = _grounded_trainer(tmp_path / "aux", max_steps=3, **aux)
    with_aux.fit()
    without = _grounded_trainer(tmp_path / "plain", max_steps=3)
    without.fit()
    records = _steps(tmp_path / "aux")
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        terms = {k: r[f"aux_{k}"] for k in PROTOCOL_AUX}
        assert all(math.isfinite(v) for v in terms.values())
        assert r["aux_loss"] == pytest.approx(sum(PROTOCOL_AUX[k] * v for k, v in terms.items()), rel=1e-6)
    # Step 0 sees the same weights (the same loss); the updates then differ.
    plain = _steps(tmp_path / "plain")
    assert records[0]["loss"] == plain[0]["loss"]
    assert records[2]["loss"] != plain[2]["loss"]


def test_protocol_optimizer_groups():
    config = load_config(MINIMAL, ["model.preset=tiny-grounded"])
    model = _tiny_grounded()
    groups = {g["name"]: g for g in build_optimizer(model, config.optim).param_groups}
    lr = config.optim.lr
    expected = {
        "ssm": (0.5, 0.1),
        "ssm_no_decay": (0.5, 0.0),
        "memory": (0.3, 0.01),
        "memory_no_decay": (0.3, 0.0),
        "default": (1.0, 0.1),
        "default_no_decay": (1.0, 0.0),
    }
    assert set(groups) <= set(expected)
    member = {}
    for name, group in groups.items():
        mult, decay = expected[name]
        assert group["lr"] == pytest.approx(lr * mult) and group["weight_decay"] == decay, name
        member.update({p: name for p in group["param_names"]})
    assert set(member) == {n for n, _ in model.named_parameters()}
    for i in range(2):
        prefix = f"layers.{i}.mixer."
        for leaf in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"):
            assert member[prefix + "ssm." + leaf] == "ssm", leaf
        for leaf in ("A_raw", "D", "dt_proj.bias", "norm.weight", "norm.bias"):
            assert member[prefix + "ssm." + leaf] == "ssm_no_decay", leaf
        for leaf in ("receptance", "key", "value", "gate", "query", "out_proj"):
            assert member[f"{prefix}memory.{leaf}.weight"] == "memory", leaf
        for leaf in ("log_decay", "time_first", "ln_x.weight", "ln_x.bias"):
            assert member[prefix + "memory." + leaf] == "memory_no_decay", leaf
        assert member[prefix + "gate_proj.weight"] == "default"
        assert member[prefix + "gate_proj.bias"] == "default_no_decay"
        assert member[f"layers.{i}.norm.weight"] == "default_no_decay"
    assert member["embedding.weight"] == "default_no_decay"  # tied to the head


def test_set_training_step_follows_optimizer_steps(tmp_path, monkeypatch):
    """grad_accum 2 and a state probe after every step: the modules are told the optimizer step
    before each micro-batch, and the probe (eval mode) advances nothing."""
    model = _tiny_grounded()
    calls: dict[int, list[int]] = {}
    for i, mixer in enumerate(_mixers(model)):
        original = mixer.set_training_step

        def spy(step: int, _i: int = i, _original=original) -> None:
            calls.setdefault(_i, []).append(step)
            _original(step)

        monkeypatch.setattr(mixer, "set_training_step", spy)
    trainer = _grounded_trainer(tmp_path, model=model, max_steps=3, grad_accum=2, monitor__state_every=1)
    trainer.fit()
    assert calls == {0: [0, 0, 1, 1, 2, 2], 1: [0, 0, 1, 1, 2, 2]}
    for mixer in _mixers(model):
        # The last training forward ran at step 2 and counted itself: 3, not 6 micro-batches.
        assert int(mixer.step) == 3 and int(mixer.memory.step) == 3
        # One gate-history entry per optimizer step (both micro-batches of a step write the same
        # slot), all at the fixed 0.7 (tiny-grounded fixes the gate for 4 steps).
        torch.testing.assert_close(mixer.gate_trace(), torch.full((3,), 0.7))


def test_grounded_minimal_config_runs_at_tiny_sizes(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
    )
    overrides = [
        "model.preset=tiny-grounded",
        f"data.path={text}",
        "data.seq_len=24",
        "data.micro_batch_size=2",
        "max_steps=6",
        f"out_dir={tmp_path / 'run'}",
        "device=cpu",
        "progress=false",
        "tensorboard=false",
        "plots=false",
        "eval_every=3",
        "eval_batches=2",
        "monitor.grad_every=2",
        "monitor.state_every=2",
        "recovery.every=3",
        "guard.snapshot_every=2",
        "checkpoint.every=0",
    ]
    config = load_config(MINIMAL, overrides)
    assert config.aux.weights() == PROTOCOL_AUX and config.aux.state_target == 5.0
    assert config.max_grad_norm == 1.0 and config.guard.enabled and config.precision == "bf16"
    result = Trainer(config).fit()
    assert result.step == 6 and math.isfinite(result.final_loss)
    records = _steps(tmp_path / "run")
    assert len(records) == 6
    for r in records:
        assert all(math.isfinite(r[f"aux_{k}"]) for k in PROTOCOL_AUX) and math.isfinite(r["loss"])
    log = read_log(tmp_path / "run" / LOG_FILE)
    assert any(r["type"] == "eval" and math.isfinite(r["val_loss"]) for r in log)
    assert any(r["type"] == "state" for r in log)
    assert not [e for e in result.events if e["event"] in ("skipped_step", "rollback")]


@pytest.mark.parametrize("name", ["grounded-minimal", "grounded-production", "grounded-protocol"])
def test_protocol_configs_load_with_clipping_and_ssm_group(name):
    config = load_config(ROOT / "configs" / "train" / f"{name}.yaml")
    assert config.max_grad_norm == 1.0 and config.guard.enabled
    groups = {g["name"]: g for g in config.optim.groups}
    assert groups["ssm"]["lr_mult"] == 0.5 and groups["ssm"]["weight_decay"] == 0.1
    if name != "grounded-protocol":  # the hybrid model has no grounded memory
        assert groups["memory"]["lr_mult"] == 0.3 and groups["memory"]["weight_decay"] == 0.01
        assert config.aux.weights() == PROTOCOL_AUX and config.aux.state_target == 5.0
        assert config.model["preset"] == name


def test_bf16_state_probe_of_a_mamba2_model(tmp_path):
    """The state monitor's probe runs without autocast: a bf16 Mamba-2 forward refuses the fp32
    conv state of the monitor's cache."""
    config = small_config(
        tmp_path, precision="bf16", max_steps=2, monitor__state_every=1, model={"preset": "tiny-mamba2"}
    )
    trainer = Trainer(config, model=models.LanguageModel(models.get_preset("tiny-mamba2")),
                      train_stream=random_stream(vocab_size=101))  # fmt: skip
    trainer.fit()
    states = [r for r in read_log(tmp_path / LOG_FILE) if r["type"] == "state"]
    assert [r["step"] for r in states] == [1, 2]
    assert all(math.isfinite(v["mean"]) for r in states for v in r["layers"].values())
