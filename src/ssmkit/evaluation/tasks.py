"""The Mamba paper's synthetic tasks as experiments: train small models, score them, compare.

Three experiments, each one function taking its config dataclass and returning a JSON-able dict:

- :func:`run_selective_copying` (paper section 4.1, Table 1): a Mamba-1 (S6) model against the same
  stack with S4D layers (input-independent, LTI dynamics); accuracy on the copied tokens.
- :func:`run_induction_heads` (Table 2): Mamba against a Transformer of about the same size, trained
  at one length and tested at lengths 2^6 .. a configurable maximum (streamed through the
  inference cache in chunks, so the SSM's memory stays flat however long the test sequence).
- :func:`run_mqar` (Zoology's multi-query associative recall): Mamba-1, Mamba-2 and attention over
  a grid of model widths and sequence lengths.

Training goes through :func:`train_on_task`, a short loop over a seeded batch generator (the
:class:`ssmkit.training.Trainer` reads token streams, not generated batches) that reuses the
trainer's components rather than copying them: AdamW parameter groups
(:func:`~ssmkit.training.optim.build_optimizer`), the warmup + cosine schedule
(:class:`~ssmkit.training.schedule.LRSchedule`), gradient norms and clipping
(:mod:`~ssmkit.training.grad_monitor`) and the non-finite/spike guard with in-memory rollback
(:mod:`~ssmkit.training.guards`).

Defaults are the CPU settings (selective copying: a few minutes with one CPU thread, at a smaller
size than the paper's, see docs/results.md). The paper-size settings live in
``configs/tasks/*-paper.yaml`` (GPU benchmarks).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ssmkit.data.synthetic import IGNORE, AssociativeRecall, InductionHeads, SelectiveCopying
from ssmkit.training.config import GuardConfig, OptimConfig, ScheduleConfig
from ssmkit.training.grad_monitor import clip_gradients, gradient_norms, named_grads
from ssmkit.training.guards import Guard, capture_snapshot, restore_snapshot
from ssmkit.training.optim import build_optimizer
from ssmkit.training.schedule import LRSchedule

logger = logging.getLogger(__name__)

# Held-out batches come from the same generator with this offset added to the seed, so no
# evaluation sequence is ever a training sequence.
EVAL_SEED_OFFSET = 1_000

# A progress callback receives one dict per event: {"kind": "start" | "step" | "eval" | "done",
# "run": label, "step", "total", "loss", "accuracy", "tokens_per_s", ...}.
Callback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- configuration
# The trainer's loss-spike rule (skip a step whose loss exceeds spike_factor x the running average,
# roll back after three) suits language-model pretraining, where the loss stays well above zero. On
# these tasks the loss heads for zero with small batches, and then a batch holding one or two
# mistakes is several times the average by nature: at the default factor 3 the guard skipped ever
# more steps near convergence and finally raised TrainingDiverged in a selective-copying run (batch
# 8, lr 1e-2) that was at 97% accuracy. Only losses a million times the average (a real blow-up)
# count as spikes here; non-finite losses and gradients are still skipped and rolled back.
TASK_SPIKE_FACTOR = 1e6


@dataclass
class TaskTrainConfig:
    """How each model of an experiment is trained. ``optim``, ``schedule`` and ``guard`` are the
    trainer's own config sections (see :mod:`ssmkit.training.config`). These defaults are the CPU
    settings of induction heads and MQAR; selective copying has its own
    (:class:`SelectiveCopyingTrainConfig`)."""

    steps: int = 600
    batch_size: int = 32
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    eval_batch_size: int = 64
    # Stop once this many seconds of training have passed (0: no limit), then score: a cap for runs
    # on a lent machine. The schedule is not refitted, so a capped run ends at a higher lr.
    max_seconds: float = 0.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.0))
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(warmup_steps=20, decay="cosine", min_lr_ratio=0.1)
    )
    guard: GuardConfig = field(
        default_factory=lambda: GuardConfig(snapshot_every=50, spike_factor=TASK_SPIKE_FACTOR)
    )


@dataclass
class SelectiveCopyingTrainConfig(TaskTrainConfig):
    """The CPU selective-copying default: many small steps (batch 8) at a high learning rate with a
    longer warmup. Per sequence seen, batches of 8 learned faster than batches of 16, 32 or 64, and
    batches of 4 stalled at chance; docs/results.md has the runs behind each value."""

    steps: int = 3000
    batch_size: int = 8
    eval_every: int = 250
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, weight_decay=0.0))
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(warmup_steps=100, decay="cosine", min_lr_ratio=0.1)
    )


def _mamba1(d_model: int = 64) -> dict[str, Any]:
    return {"d_model": d_model, "n_layer": 2, "default_layer": "mamba1", "mamba1": {"d_state": 16}}


@dataclass
class TaskConfig:
    """Fields shared by every experiment. ``models`` maps a row label to
    :class:`ssmkit.models.ModelConfig` fields (the vocabulary is set by the task); ``device``:
    "auto" (CUDA when present), "cpu" or "cuda"."""

    models: dict[str, dict] = field(default_factory=dict)
    train: TaskTrainConfig = field(default_factory=TaskTrainConfig)
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.models:
            raise ValueError("models must name at least one model (label: ModelConfig fields)")
        for name, value in (("train.steps", self.train.steps), ("train.batch_size", self.train.batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass
class SelectiveCopyingConfig(TaskConfig):
    """Selective copying: ``num_tokens`` data tokens (vocabulary ``vocab_data``) among noise in a
    context of ``seqlen``. The paper: 16 tokens in a context of 4096, d_model 64, hundreds of
    thousands of steps (``configs/tasks/selective-copying-paper.yaml``). The default is sized for
    about six minutes on a 2-core CPU: 8 tokens in a context of 64 (the paper's vocabulary of 16,
    the same task), d_model 128, 3000 steps of batch 8. 16 tokens learned far more slowly (39% after
    2000 such steps); in a context of 32 the LTI baseline reached 60-72% (see docs/results.md)."""

    seqlen: int = 64
    num_tokens: int = 8
    vocab_data: int = 16
    train: SelectiveCopyingTrainConfig = field(default_factory=SelectiveCopyingTrainConfig)

    def __post_init__(self) -> None:
        if not self.models:
            # Both rows: 2 layers, d_model 128, state size 32, embeddings initialised with std 0.1
            # (0.02 left a longer plateau at chance before the copying started).
            self.models = {
                "Mamba-1 (S6)": {
                    "d_model": 128,
                    "n_layer": 2,
                    "default_layer": "mamba1",
                    # dt initialised in [0.01, 1] rather than [0.001, 0.1]: learned faster here.
                    "mamba1": {"d_state": 32, "dt_min": 0.01, "dt_max": 1.0},
                    "initializer_range": 0.1,
                },
                # The same stack with S4D layers (input-independent, LTI); the MLP brings its parameter
                # count up to Mamba-1's. S4 keeps its default dt range, with which it did better.
                "S4 (LTI)": {
                    "d_model": 128,
                    "n_layer": 2,
                    "default_layer": "s4",
                    "s4": {"d_state": 32},
                    "mlp": {"d_intermediate": 228},
                    "initializer_range": 0.1,
                },
            }


@dataclass
class InductionHeadsConfig(TaskConfig):
    """Induction heads: train at ``seqlen`` (vocabulary ``vocab_size``), test at every power of two
    from ``min_test_length`` to ``max_test_length``. Test sequences go through the inference cache
    in pieces of ``eval_chunk`` tokens; each length is scored on ``test_sequences`` sequences,
    fewer (but at least 16) when they would exceed ``test_tokens`` tokens. Attention models are
    tested only up to ``attention_max_length`` (their memory grows with the length); longer rows
    are reported as not run."""

    seqlen: int = 256
    vocab_size: int = 16
    min_test_length: int = 64
    max_test_length: int = 4096
    eval_chunk: int = 4096
    attention_max_length: int = 4096
    test_sequences: int = 256
    test_tokens: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.models:
            self.models = {
                "Mamba-1": _mamba1(),
                # Same width and depth; the MLP brings the parameter count close to Mamba's.
                "Transformer (RoPE)": {
                    "d_model": 64,
                    "n_layer": 2,
                    "default_layer": "attention",
                    "attention": {"num_heads": 4},
                    "mlp": {"d_intermediate": 88},
                },
            }

    def test_lengths(self) -> list[int]:
        lengths, length = [], self.min_test_length
        while length <= self.max_test_length:
            lengths.append(length)
            length *= 2
        return lengths


@dataclass
class MQARConfig(TaskConfig):
    """Multi-query associative recall over ``d_models`` x ``seqlens``; each model's entry is built
    at every width in ``d_models`` (its own ``d_model`` is replaced). ``num_pairs`` key-value pairs
    per sequence (None: seqlen // 16, at least 2, as Zoology grows the pairs with the length)."""

    d_models: list[int] = field(default_factory=lambda: [32, 64])
    seqlens: list[int] = field(default_factory=lambda: [64, 128])
    vocab_size: int = 256
    num_pairs: int | None = None

    def __post_init__(self) -> None:
        if not self.models:
            self.models = {
                "Mamba-1": {"n_layer": 2, "default_layer": "mamba1", "mamba1": {"d_state": 16}},
                "Mamba-2": {
                    "n_layer": 2,
                    "default_layer": "mamba2",
                    "mamba2": {"d_state": 32, "headdim": 16, "chunk_size": 64},
                },
                "Attention": {"n_layer": 2, "default_layer": "attention", "attention": {"num_heads": 4}},
            }

    def pairs_for(self, seqlen: int) -> int:
        return self.num_pairs if self.num_pairs is not None else max(2, seqlen // 16)


TASK_CONFIGS: dict[str, type[TaskConfig]] = {
    "selective-copying": SelectiveCopyingConfig,
    "induction-heads": InductionHeadsConfig,
    "mqar": MQARConfig,
}


def load_task_config(task: str, path: str | None = None, overrides: list[str] | None = None) -> TaskConfig:
    """The config of ``task`` (a key of ``TASK_CONFIGS``): the defaults, or a YAML file, then
    ``key=value`` overrides (``train.steps=100 seqlen=512 train.optim.lr=1e-3``)."""
    from pathlib import Path

    import yaml

    from ssmkit.training.config import _from_dict, apply_overrides

    if task not in TASK_CONFIGS:
        raise ValueError(f"task must be one of {sorted(TASK_CONFIGS)}, got {task!r}")
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"task config {file} does not exist")
        data = yaml.safe_load(file.read_text()) or {}
        named = data.pop("task", task)
        if named != task:
            raise ValueError(f"{file} is a config for task {named!r}, not {task!r}")
    data = apply_overrides(data, overrides or [])
    # The training config's reader: nested dataclasses, type coercion, unknown keys are errors.
    config = _from_dict(TASK_CONFIGS[task], data, "")
    config.validate()
    return config


# ---------------------------------------------------------------- models
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_task_model(spec: dict[str, Any], vocab_size: int, *, seed: int) -> nn.Module:
    """A :class:`ssmkit.models.LanguageModel` from ModelConfig fields (or ``preset`` plus fields), with
    the task's vocabulary, initialised from ``seed`` (so every row of a table starts the same way)."""
    from ssmkit.models import LanguageModel, ModelConfig
    from ssmkit.training.trainer import build_model

    torch.manual_seed(seed)
    spec = dict(spec)
    if "preset" in spec:
        return build_model({**spec, "vocab_size": vocab_size}, vocab_size)
    spec.setdefault("pad_vocab_size_multiple", 8)
    return LanguageModel(ModelConfig.from_dict({**spec, "vocab_size": vocab_size}))


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def answer_predictions(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions at the answer positions only.

    input_ids, labels: (batch, seqlen) with labels IGNORE outside the answers (next-token convention:
    position t is scored against labels[t + 1]). With ``chunk`` the sequence is fed through the
    model's inference cache ``chunk`` tokens at a time, so activation memory does not grow with the
    length (an SSM then holds only its fixed-size state).

    Returns (predicted ids, targets), both (num_answers,).
    """
    batch, seqlen = input_ids.shape
    if chunk is None or chunk >= seqlen:
        predicted = model(input_ids).logits.argmax(-1)
    else:
        # Only the argmax of each chunk is kept: (batch, seqlen) ids instead of (batch, seqlen, vocab).
        cache = model.allocate_cache(batch)
        predicted = torch.empty(batch, seqlen, dtype=torch.long, device=input_ids.device)
        for start in range(0, seqlen, chunk):
            piece = slice(start, min(seqlen, start + chunk))
            predicted[:, piece] = model(input_ids[:, piece], cache=cache).logits.argmax(-1)
    targets = labels[:, 1:]
    scored = targets != IGNORE
    return predicted[:, :-1][scored], targets[scored]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    task: Any,
    *,
    batches: int,
    batch_size: int,
    device: torch.device,
    chunk: int | None = None,
) -> float:
    """Accuracy on the answer tokens of ``batches`` batches of ``task`` (batch indices 0..batches-1).

    ``task`` is a generator of :mod:`ssmkit.data.synthetic` (``batch(batch_size, index)``)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for index in range(batches):
        input_ids, labels = task.batch(batch_size, index)
        predicted, targets = answer_predictions(model, input_ids.to(device), labels.to(device), chunk=chunk)
        correct += int((predicted == targets).sum())
        total += targets.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("the evaluation batches contain no answer positions")
    return correct / total


@torch.no_grad()
def accuracy_by_query_order(
    model: nn.Module, task: AssociativeRecall, *, batches: int, batch_size: int, device: torch.device
) -> list[float]:
    """MQAR accuracy of the 1st, 2nd, ... query of each sequence (in sequence order), on the same
    batches as :func:`evaluate_accuracy`.

    A model that has not learned to bind keys to values can still answer by elimination: a query
    whose value is the only one not yet answered earlier in the sequence needs no binding. Such a
    model scores 1/K, 1/(K-1), ..., 1 on the K queries, which the overall accuracy hides.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros(task.num_pairs)
    for index in range(batches):
        input_ids, labels = task.batch(batch_size, index)
        predicted, targets = answer_predictions(model, input_ids.to(device), labels.to(device))
        # Every row holds num_pairs answers, flattened row by row in position order.
        hits = (predicted == targets).view(batch_size, task.num_pairs)
        correct += hits.float().sum(dim=0).cpu()
    model.train(was_training)
    return (correct / (batches * batch_size)).tolist()


def _held_out(task: Any) -> Any:
    return type(task)(**{**task.__dict__, "seed": task.seed + EVAL_SEED_OFFSET})


# ---------------------------------------------------------------- training
@dataclass
class TaskRun:
    """The outcome of training one model on one task. curve: [(step, accuracy on held-out batches)];
    losses: [(step, training loss)]; events: guard decisions (skipped steps, rollbacks)."""

    label: str
    parameters: int
    steps: int
    final_loss: float
    accuracy: float
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "parameters": self.parameters,
            "steps": self.steps,
            "final_loss": self.final_loss,
            "accuracy": self.accuracy,
            "seconds": self.seconds,
            "curve": [list(p) for p in self.curve],
            "losses": [list(p) for p in self.losses],
            "events": self.events,
        }


def train_on_task(
    model: nn.Module,
    task: Any,
    config: TaskTrainConfig,
    *,
    device: torch.device,
    label: str = "model",
    callback: Callback | None = None,
    eval_chunk: int | None = None,
) -> TaskRun:
    """Train ``model`` on batches of ``task`` for ``config.steps`` optimizer steps and score it on
    held-out batches (the same generator, another seed) every ``eval_every`` steps and at the end.

    One step: forward and backward of a fresh batch (batch index = iteration, so data never
    repeats, even after a rollback), gradient norm, the guard's verdict, then clip and step, or skip,
    or roll back to an in-memory snapshot with a lower learning rate.
    """
    model.to(device).train()
    optimizer = build_optimizer(model, config.optim)
    schedule = LRSchedule(optimizer, config.schedule, config.steps)
    guard = Guard(config.guard)
    if config.guard.enabled:
        guard.add_snapshot(capture_snapshot(0, model, optimizer, {}))
    held_out = _held_out(task)
    parameters = sum(p.numel() for p in model.parameters())
    run = TaskRun(label, parameters, 0, float("nan"), float("nan"), 0.0)
    emit = callback or (lambda event: None)
    emit({"kind": "start", "run": label, "total": config.steps, "parameters": parameters})

    def score() -> float:
        return evaluate_accuracy(
            model,
            held_out,
            batches=config.eval_batches,
            batch_size=config.eval_batch_size,
            device=device,
            chunk=eval_chunk,
        )

    started = time.perf_counter()
    step = iteration = 0
    while step < config.steps:
        tick = time.perf_counter()
        schedule.apply(step)
        input_ids, labels = task.batch(config.batch_size, iteration)
        input_ids, labels = input_ids.to(device), labels.to(device)
        loss = model(input_ids, labels=labels).loss
        loss.backward()
        named = named_grads(model)
        grads = [g for _, _, g in named]
        per_param, total_norm = gradient_norms(grads)
        grad_norm = total_norm.item()
        bad = (
            []
            if math.isfinite(grad_norm)
            else [n for (n, _, _), v in zip(named, per_param.tolist()) if not math.isfinite(v)]
        )
        loss_value = loss.item()
        verdict = guard.inspect(iteration, loss=loss_value, grad_norm=grad_norm, bad_params=bad)
        if verdict.ok:
            clip_gradients(grads, total_norm, config.max_grad_norm)
            optimizer.step()
            guard.record_good(loss_value)
        optimizer.zero_grad(set_to_none=True)
        iteration += 1
        if not verdict.ok:
            event = {
                "event": "skipped_step",
                "step": step,
                "reason": verdict.reason,
                "message": verdict.message,
            }
            run.events.append(event)
            logger.warning("%s: step %d skipped: %s", label, step, verdict.message)
            if verdict.rollback:
                snapshot = guard.rollback_target()
                restore_snapshot(snapshot, model, optimizer)
                schedule.scale *= verdict.lr_factor
                run.events.append({"event": "rollback", "from_step": step, "to_step": snapshot.step})
                logger.warning("%s: rolled back from step %d to %d", label, step, snapshot.step)
                step = snapshot.step
            continue
        step += 1
        run.losses.append((step, loss_value))
        elapsed = time.perf_counter() - tick
        emit(
            {
                "kind": "step",
                "run": label,
                "step": step,
                "total": config.steps,
                "loss": loss_value,
                "tokens_per_s": input_ids.numel() / elapsed if elapsed > 0 else float("nan"),
            }
        )
        if config.guard.enabled and guard.wants_snapshot(step):
            guard.add_snapshot(capture_snapshot(step, model, optimizer, {}))
        if step == config.steps or (config.eval_every > 0 and step % config.eval_every == 0):
            accuracy = score()
            run.curve.append((step, accuracy))
            emit({"kind": "eval", "run": label, "step": step, "total": config.steps, "accuracy": accuracy})
        if config.max_seconds > 0 and time.perf_counter() - started >= config.max_seconds:
            run.events.append({"event": "time_limit", "step": step, "max_seconds": config.max_seconds})
            logger.warning("%s: stopped at step %d: max_seconds %s reached", label, step, config.max_seconds)
            break
    run.steps = step
    run.final_loss = run.losses[-1][1] if run.losses else float("nan")
    if not run.curve or run.curve[-1][0] != step:
        run.curve.append((step, score()))
    run.accuracy = run.curve[-1][1]
    run.seconds = time.perf_counter() - started
    emit({"kind": "done", "run": label, "accuracy": run.accuracy, "seconds": run.seconds})
    return run


# ---------------------------------------------------------------- the experiments
def _header(task: str, config: TaskConfig, device: torch.device) -> dict[str, Any]:
    import dataclasses

    import ssmkit

    return {
        "task": task,
        "config": dataclasses.asdict(config),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "ssmkit_version": ssmkit.__version__,
        "torch_version": torch.__version__,
    }


def run_selective_copying(
    config: SelectiveCopyingConfig, *, callback: Callback | None = None
) -> dict[str, Any]:
    """Train every model of ``config.models`` on selective copying; returns
    ``{"task", "config", "device", "rows": [TaskRun.to_dict(), ...]}``."""
    config.validate()
    device = resolve_device(config.device)
    task = SelectiveCopying(
        seqlen=config.seqlen, num_tokens=config.num_tokens, vocab_data=config.vocab_data, seed=config.seed
    )
    rows = []
    for label, spec in config.models.items():
        model = build_task_model(spec, task.vocab_size, seed=config.seed)
        run = train_on_task(model, task, config.train, device=device, label=label, callback=callback)
        rows.append(run.to_dict())
        logger.info(
            "selective copying: %s accuracy %.4f (%d steps, %.0f s)",
            label,
            run.accuracy,
            run.steps,
            run.seconds,
        )
    return {**_header("selective-copying", config, device), "rows": rows}


def run_induction_heads(config: InductionHeadsConfig, *, callback: Callback | None = None) -> dict[str, Any]:
    """Train every model at ``config.seqlen``, then test it at every length of
    ``config.test_lengths()``; returns ``{..., "lengths": [...], "rows": [{..., "by_length":
    {length: accuracy or None}}]}`` (None: not run, attention beyond ``attention_max_length``)."""
    config.validate()
    device = resolve_device(config.device)
    task = InductionHeads(seqlen=config.seqlen, vocab_size=config.vocab_size, seed=config.seed)
    lengths = config.test_lengths()
    rows = []
    for label, spec in config.models.items():
        model = build_task_model(spec, task.vocab_size, seed=config.seed)
        run = train_on_task(model, task, config.train, device=device, label=label, callback=callback)
        has_attention = "attention" in model.config.layer_types
        by_length: dict[int, float | None] = {}
        for length in lengths:
            if has_attention and length > config.attention_max_length:
                by_length[length] = None
                continue
            test = InductionHeads(
                seqlen=length, vocab_size=config.vocab_size, seed=config.seed + EVAL_SEED_OFFSET
            )
            # Test time grows with the tokens scored: at most test_tokens per length, but never fewer
            # than 16 sequences; the batch shrinks as the length grows to bound activation memory.
            sequences = min(config.test_sequences, max(16, config.test_tokens // length))
            batch = max(1, min(config.train.eval_batch_size, sequences, config.test_tokens // (4 * length)))
            by_length[length] = evaluate_accuracy(
                model,
                test,
                batches=-(-sequences // batch),
                batch_size=batch,
                device=device,
                chunk=config.eval_chunk,
            )
            if callback:
                callback(
                    {"kind": "test_length", "run": label, "length": length, "accuracy": by_length[length]}
                )
        rows.append({**run.to_dict(), "by_length": by_length})
        model.to("cpu")
    return {**_header("induction-heads", config, device), "lengths": lengths, "rows": rows}


def run_mqar(config: MQARConfig, *, callback: Callback | None = None) -> dict[str, Any]:
    """Train every model at every (d_model, seqlen) of the grid; returns ``{..., "rows": [{"model",
    "d_model", "seqlen", "num_pairs", ... TaskRun fields}]}``."""
    config.validate()
    device = resolve_device(config.device)
    rows = []
    for seqlen in config.seqlens:
        task = AssociativeRecall(
            seqlen=seqlen, num_pairs=config.pairs_for(seqlen), vocab_size=config.vocab_size, seed=config.seed
        )
        for d_model in config.d_models:
            for name, spec in config.models.items():
                label = f"{name} d={d_model} L={seqlen}"
                model = build_task_model({**spec, "d_model": d_model}, task.vocab_size, seed=config.seed)
                run = train_on_task(model, task, config.train, device=device, label=label, callback=callback)
                by_query = accuracy_by_query_order(
                    model,
                    _held_out(task),
                    batches=config.train.eval_batches,
                    batch_size=config.train.eval_batch_size,
                    device=device,
                )
                rows.append(
                    {
                        "model": name,
                        "d_model": d_model,
                        "seqlen": seqlen,
                        "num_pairs": task.num_pairs,
                        **run.to_dict(),
                        "by_query_order": by_query,
                    }
                )
    return {**_header("mqar", config, device), "rows": rows}


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "selective-copying": run_selective_copying,
    "induction-heads": run_induction_heads,
    "mqar": run_mqar,
}
