"""Synthetic-task experiments: scoring, the training loop, configs, and each task end to end at tiny
sizes (seconds). Learning the tasks at full size is a benchmark (docs/results.md), not a test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ssmkit.data.synthetic import IGNORE, AssociativeRecall, InductionHeads, SelectiveCopying
from ssmkit.evaluation.tasks import (
    TASK_CONFIGS,
    SelectiveCopyingTrainConfig,
    TaskTrainConfig,
    accuracy_by_query_order,
    answer_predictions,
    build_task_model,
    evaluate_accuracy,
    load_task_config,
    run_induction_heads,
    run_mqar,
    run_selective_copying,
    train_on_task,
)
from ssmkit.models.language_model import LMOutput

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"


def _tiny(task: str, device: torch.device) -> object:
    from ssmkit.commands.eval import SMOKE_OVERRIDES

    return load_task_config(task, None, [*SMOKE_OVERRIDES[task], f"device={device.type}"])


class _Oracle(nn.Module):
    """Predicts the answers from the labels it was given (or always token 0): scoring must say 1
    (or the fraction of answers that are 0)."""

    def __init__(self, labels: torch.Tensor | None, vocab: int) -> None:
        super().__init__()
        self.labels, self.vocab = labels, vocab
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, **_: object) -> LMOutput:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.labels is None:
            logits[..., 0] = 1.0
        else:
            nxt = self.labels[:, 1:].clamp_min(0)
            logits[:, :-1].scatter_(-1, nxt[..., None], 1.0)
        return LMOutput(logits=logits)


def test_answer_scoring_counts_only_answers() -> None:
    task = SelectiveCopying(seqlen=40, num_tokens=5, seed=3)
    input_ids, labels = task.batch(6)
    predicted, targets = answer_predictions(_Oracle(labels, task.vocab_size), input_ids, labels)
    assert targets.numel() == 6 * 5
    assert torch.equal(predicted, targets)
    wrong, _ = answer_predictions(_Oracle(None, task.vocab_size), input_ids, labels)
    assert (wrong == 0).all()  # token 0 is noise: never an answer, so accuracy 0


class _LastQueryOnly(nn.Module):
    """Answers each sequence's last MQAR query correctly (by reading the next input token) and
    every other query with token 0, as a model answering only by elimination would at best."""

    def __init__(self, task: AssociativeRecall) -> None:
        super().__init__()
        self.task = task
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, **_: object) -> LMOutput:
        logits = torch.zeros(*input_ids.shape, self.task.vocab_size)
        logits[..., 0] = 1.0
        keys = input_ids[:, : 2 * self.task.num_pairs : 2]
        for row in range(input_ids.shape[0]):
            # Query keys sit after the key-value prefix; the last one is the rightmost key token.
            after = input_ids[row, 2 * self.task.num_pairs : -1]
            is_key = torch.isin(after, keys[row])
            last = 2 * self.task.num_pairs + int(is_key.nonzero()[-1])
            logits[row, last, int(input_ids[row, last + 1])] = 2.0
        return LMOutput(logits=logits)


def test_accuracy_by_query_order_separates_the_queries() -> None:
    task = AssociativeRecall(seqlen=48, num_pairs=3, vocab_size=32, seed=2)
    by_query = accuracy_by_query_order(
        _LastQueryOnly(task), task, batches=2, batch_size=5, device=torch.device("cpu")
    )
    assert by_query == [0.0, 0.0, 1.0]
    cpu = torch.device("cpu")
    overall = evaluate_accuracy(_LastQueryOnly(task), task, batches=2, batch_size=5, device=cpu)
    assert overall == pytest.approx(sum(by_query) / 3)


def test_answer_scoring_streamed_equals_whole(device: torch.device) -> None:
    """The chunked path through the inference cache predicts exactly what one call predicts."""
    task = InductionHeads(seqlen=75, vocab_size=16, seed=1)
    model = build_task_model(
        {"d_model": 24, "n_layer": 2, "default_layer": "mamba1", "mamba1": {"d_state": 5}}, 16, seed=0
    ).to(device)
    model.eval()
    input_ids, labels = (t.to(device) for t in task.batch(3))
    whole_logits = model(input_ids).logits
    cache = model.allocate_cache(3)
    pieces = [model(input_ids[:, s : s + 16], cache=cache).logits for s in range(0, 76, 16)]
    streamed_logits = torch.cat(pieces, dim=1)
    assert (streamed_logits - whole_logits).abs().max().item() < 1e-4
    whole, targets = answer_predictions(model, input_ids, labels)
    streamed, targets2 = answer_predictions(model, input_ids, labels, chunk=16)
    assert torch.equal(targets, targets2)
    assert torch.equal(whole, streamed)


def test_evaluate_accuracy_of_an_oracle_is_one() -> None:
    task = SelectiveCopying(seqlen=30, num_tokens=3, seed=0)

    class LabelOracle(_Oracle):
        def forward(self, input_ids: torch.Tensor, **_: object) -> LMOutput:
            # The generator is deterministic: find the labels of this very batch again.
            for index in range(4):
                ids, labels = task.batch(input_ids.shape[0], index)
                if torch.equal(ids, input_ids):
                    self.labels = labels
            return super().forward(input_ids)

    accuracy = evaluate_accuracy(
        LabelOracle(None, task.vocab_size), task, batches=3, batch_size=4, device=torch.device("cpu")
    )
    assert accuracy == 1.0


def test_training_loop_learns_a_short_copy(device: torch.device) -> None:
    """A 1-token selective copy over a 4-token context is learnable in a few dozen steps: the loop
    (optimizer groups, schedule, clipping) must bring the loss well below chance (ln 16 = 2.77)."""
    task = SelectiveCopying(seqlen=4, num_tokens=1, seed=0)
    model = build_task_model(
        {"d_model": 32, "n_layer": 1, "default_layer": "mamba1", "mamba1": {"d_state": 4}},
        task.vocab_size,
        seed=0,
    )
    config = TaskTrainConfig(steps=60, batch_size=32, eval_every=0, eval_batches=2, eval_batch_size=64)
    config.optim.lr = 1e-2
    config.schedule.warmup_steps = 5
    run = train_on_task(model, task, config, device=device, label="copy")
    assert run.steps == 60 and len(run.losses) == 60
    first = sum(loss for _, loss in run.losses[:5]) / 5
    last = sum(loss for _, loss in run.losses[-5:]) / 5
    assert first > 2.5 and last < 1.0, (first, last)
    assert run.accuracy > 0.7
    assert run.curve[-1] == (60, run.accuracy)


def test_max_seconds_stops_training_and_scores_the_last_step(device: torch.device) -> None:
    """A time cap ends the run early, logs it, and the reported accuracy is the last step's."""
    task = SelectiveCopying(seqlen=8, num_tokens=2, seed=0)
    model = build_task_model(
        {"d_model": 16, "n_layer": 1, "default_layer": "mamba1", "mamba1": {"d_state": 4}},
        task.vocab_size,
        seed=0,
    )
    config = TaskTrainConfig(steps=10_000, batch_size=4, eval_every=1000, eval_batches=1, eval_batch_size=4)
    config.max_seconds = 1e-9  # spent after the first step
    run = train_on_task(model, task, config, device=device)
    assert run.steps == 1 and len(run.losses) == 1
    assert [e["event"] for e in run.events] == ["time_limit"]
    assert run.curve == [(1, run.accuracy)]


def test_guard_skips_non_finite_steps_and_rolls_back(device: torch.device) -> None:
    """The trainer's guard is in the loop: NaN losses are skipped, three in a row roll back."""
    task = SelectiveCopying(seqlen=8, num_tokens=2, seed=0)
    model = build_task_model(
        {"d_model": 16, "n_layer": 1, "default_layer": "mamba1", "mamba1": {"d_state": 4}},
        task.vocab_size,
        seed=0,
    )
    calls = {"n": 0}
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if out.loss is not None and 5 <= calls["n"] < 8:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    config = TaskTrainConfig(steps=10, batch_size=4, eval_every=0, eval_batches=1, eval_batch_size=4)
    config.guard.snapshot_every = 2
    run = train_on_task(model, task, config, device=device)
    skipped = [e for e in run.events if e["event"] == "skipped_step"]
    rollbacks = [e for e in run.events if e["event"] == "rollback"]
    assert len(skipped) == 3 and all(e["reason"] == "nan_loss" for e in skipped)
    assert len(rollbacks) == 1 and rollbacks[0]["to_step"] == 4
    assert run.steps == 10 and all(math.isfinite(loss) for _, loss in run.losses)


@pytest.mark.parametrize("task", sorted(TASK_CONFIGS))
def test_every_task_runs_at_tiny_size(task: str, device: torch.device) -> None:
    config = _tiny(task, device)
    runner = {
        "selective-copying": run_selective_copying,
        "induction-heads": run_induction_heads,
        "mqar": run_mqar,
    }
    events: list[dict] = []
    results = runner[task](config, callback=events.append)
    assert results["task"] == task and results["rows"]
    for row in results["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["steps"] == config.train.steps
        assert math.isfinite(row["final_loss"])
    assert {e["kind"] for e in events} >= {"start", "step", "eval", "done"}
    json.dumps(results)  # JSON-able as written by the command
    if task == "induction-heads":
        assert results["lengths"] == [64, 128]
        mamba, transformer = results["rows"]
        assert all(v is not None for v in mamba["by_length"].values())
        # attention_max_length=64 in the smoke settings: the longer test is not run, and says so
        assert transformer["by_length"][64] is not None and transformer["by_length"][128] is None


def test_task_configs_in_the_repository_load_and_defaults_match() -> None:
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {*TASK_CONFIGS, *(f"{t}-paper" for t in TASK_CONFIGS)}
    for file in files:
        task = file.stem.removesuffix("-paper")
        load_task_config(task, str(file))
    # Configs of recorded runs (one folder per run) name their task on their first line.
    for file in sorted(CONFIG_DIR.glob("*/*.yaml")):
        task = file.read_text().splitlines()[0].removeprefix("task:").strip()
        assert task in TASK_CONFIGS, file
        load_task_config(task, str(file))
    # The CPU default files must say what the code does with no file at all.
    for task, cls in TASK_CONFIGS.items():
        assert load_task_config(task, str(CONFIG_DIR / f"{task}.yaml")) == cls()


def test_partial_train_overrides_keep_each_tasks_defaults() -> None:
    """A ``train.*`` override replaces one value; the rest stays the task's own default (selective
    copying trains with small batches, the other tasks with the shared defaults)."""
    copying = load_task_config("selective-copying", None, ["train.steps=5"])
    assert copying.train.steps == 5
    assert copying.train.batch_size == SelectiveCopyingTrainConfig().batch_size == 8
    assert copying.train.optim.lr == SelectiveCopyingTrainConfig().optim.lr
    induction = load_task_config("induction-heads", None, ["train.steps=5"])
    assert induction.train.batch_size == TaskTrainConfig().batch_size == 32


def test_task_guard_tolerates_relative_spikes_near_zero_loss() -> None:
    """Near zero loss a small batch with one mistake is many times the running average: the tasks'
    guard lets it through (the trainer's default would skip it), and still stops non-finite losses."""
    from ssmkit.training.config import GuardConfig
    from ssmkit.training.guards import Guard

    def settled(config: GuardConfig) -> Guard:
        guard = Guard(config)
        for _ in range(100):
            guard.record_good(0.02)
        return guard

    assert settled(TaskTrainConfig().guard).inspect(100, loss=0.3, grad_norm=1.0).ok
    assert not settled(GuardConfig()).inspect(100, loss=0.3, grad_norm=1.0).ok
    verdict = settled(TaskTrainConfig().guard).inspect(101, loss=float("nan"), grad_norm=1.0)
    assert not verdict.ok and verdict.reason == "nan_loss"


def test_task_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown config keys"):
        load_task_config("selective-copying", None, ["seq_len=5"])
    with pytest.raises(ValueError, match="train.steps must be >= 1"):
        load_task_config("selective-copying", None, ["train.steps=0"])
    with pytest.raises(ValueError, match="task must be one of"):
        load_task_config("copying", None)
    other = tmp_path / "x.yaml"
    other.write_text("task: mqar\n")
    with pytest.raises(ValueError, match="not 'selective-copying'"):
        load_task_config("selective-copying", str(other))
    config = load_task_config("mqar", None, ["seqlens=[64, 96]", "train.optim.lr=1e-3"])
    assert config.seqlens == [64, 96] and config.train.optim.lr == 1e-3 and config.pairs_for(96) == 6


@pytest.mark.parametrize("task", sorted(TASK_CONFIGS))
def test_eval_command_writes_table_json_and_plot(
    task: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ssmkit.cli import main

    out = tmp_path / task
    code = main(["eval", task, "--smoke", "--no-progress", "--threads", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task
    assert (out / "accuracy.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    if task == "selective-copying":
        assert [r["label"] for r in results["rows"]] == ["Mamba-1 (S6)", "S4 (LTI)"]
        assert "Selective copying" in printed and "S4 (LTI)" in printed
    elif task == "induction-heads":
        assert "2^6" in printed and "2^7" in printed  # one column per test length
    else:
        assert {r["model"] for r in results["rows"]} == {"Mamba-1", "Mamba-2", "Attention"}


def test_labels_of_the_generators_match_the_scoring_convention() -> None:
    """Sanity link to ssmkit.data.synthetic: answers are never at position 0 (nothing predicts it)."""
    for task in (SelectiveCopying(seqlen=20, num_tokens=3), InductionHeads(seqlen=16)):
        _, labels = task.batch(2)
        assert (labels[:, 0] == IGNORE).all()
