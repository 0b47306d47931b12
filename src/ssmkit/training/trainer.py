"""The training loop.

:meth:`Trainer.fit` is the whole loop; everything else here builds its parts or saves/restores
them. Each feature is a component with its own module and tests: data order
(:mod:`ssmkit.data.packing`), optimizer groups (:mod:`.optim`), schedule (:mod:`.schedule`),
guard and snapshots (:mod:`.guards`), gradient and state monitors (:mod:`.grad_monitor`,
:mod:`.state_monitor`), auxiliary losses and step-aware modules (:mod:`.aux_losses`), recovery
(:mod:`.recovery`), checkpoints (:mod:`.checkpoint`), metrics (:mod:`.metrics`) and the
distributed wrapper (:mod:`.distributed`).

One optimizer step: for each of this rank's ``grad_accum`` micro-batches, step-aware modules are
told the optimizer step, then forward (bf16 autocast when asked) and backward of its objective
(the loss, plus the weighted auxiliary terms and the state penalty when configured) weighted by
its share of the global batch's targets (so the update is the exact token mean whatever the
sharding); then the guard looks at the loss and the gradient norm, and the step is applied
(clipped) or skipped or rolled back.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ssmkit
from ssmkit.data.packing import Batch, WindowLoader, evaluation_batches
from ssmkit.data.tokens import TokenStream
from ssmkit.training import distributed as dist_utils
from ssmkit.training.aux_losses import AuxiliaryLosses, set_training_step, step_aware_modules
from ssmkit.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    gather_model_state,
    gather_optimizer_state,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
)
from ssmkit.training.config import TrainConfig
from ssmkit.training.flops import flops_per_token, peak_flops
from ssmkit.training.grad_monitor import (
    GradientMonitor,
    clip_gradients,
    gradient_norms,
    named_grads,
    zero_nonfinite_,
)
from ssmkit.training.guards import Guard, capture_snapshot, restore_snapshot
from ssmkit.training.metrics import LOG_FILE, MetricsWriter, make_plots, memory_gb
from ssmkit.training.optim import build_optimizer
from ssmkit.training.recovery import Recovery
from ssmkit.training.rng import get_rng_state, seed_everything, set_rng_state
from ssmkit.training.schedule import LRSchedule
from ssmkit.training.state_monitor import StateMonitor, state_penalty

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    iterations: int
    final_loss: float
    best_val_loss: float | None
    out_dir: Path
    events: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- building the parts
def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def build_model(model_section: dict, vocab_size: int | None) -> nn.Module:
    """A :class:`ssmkit.models.LanguageModel` from the config's ``model`` section; the vocabulary
    follows the data unless ``model.vocab_size`` is given."""
    from ssmkit.models import LanguageModel, ModelConfig, get_preset

    spec = dict(model_section)
    preset = spec.pop("preset", None)
    init_from = spec.pop("init_from", None)
    if init_from is not None:
        if spec:
            raise ValueError(f"model.init_from cannot be combined with model overrides {sorted(spec)}")
        model = LanguageModel.from_pretrained(init_from, dtype=torch.float32)
    else:
        data = _merge(get_preset(preset).to_dict(), spec)
        if vocab_size is not None and "vocab_size" not in spec:
            data["vocab_size"] = vocab_size
        model = LanguageModel(ModelConfig.from_dict(data))
    model_vocab = model.config.vocab_size
    if vocab_size is not None and vocab_size > model_vocab:
        raise ValueError(f"the data has {vocab_size} token ids but the model's vocab_size is {model_vocab}")
    return model


def build_streams(
    config: TrainConfig, out_dir: Path, is_main: bool
) -> tuple[TokenStream, TokenStream | None]:
    """(train, validation) token streams for ``config.data``; a text tokenizer is saved in out_dir."""
    import numpy as np

    from ssmkit.data import open_tokens, text_stream

    d = config.data
    if d.kind == "random":
        vocab = d.vocab_size or 256
        rng = np.random.Generator(np.random.PCG64(d.seed))
        tokens = rng.integers(0, vocab, size=d.num_tokens, dtype=np.int64)
        return TokenStream(tokens, vocab, None), None
    if d.kind == "text":
        stream, tokenizer = text_stream(
            d.path, tokenizer=d.tokenizer, vocab_size=d.bpe_vocab_size, doc_separator=d.doc_separator
        )
        if is_main:
            tokenizer.save(out_dir / "tokenizer")
        val = None
        if d.val_path:
            from ssmkit.data import encode_documents, split_documents

            docs = split_documents(Path(d.val_path).read_text(encoding="utf-8"), d.doc_separator)
            val = encode_documents(
                tokenizer.encode, docs, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id
            )
    else:
        stream = open_tokens(d.path, vocab_size=d.vocab_size, eos_id=d.eos_id, dtype=d.token_dtype)
        val = (
            open_tokens(d.val_path, vocab_size=stream.vocab_size, eos_id=stream.eos_id, dtype=d.token_dtype)
            if d.val_path
            else None
        )
    if val is None and d.val_fraction > 0:
        stream, val = stream.split(d.val_fraction)
    return stream, val


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block of ``model.layers`` in backward instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("activation_checkpointing needs a model with a .layers list of blocks")
    for block in layers:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return len(layers)


# ---------------------------------------------------------------- the trainer
class Trainer:
    """Builds everything from a :class:`TrainConfig` (or takes a ready ``model`` and streams, for
    tests and notebooks) and runs :meth:`fit`."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        train_stream: TokenStream | None = None,
        val_stream: TokenStream | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.info = dist_utils.init_distributed(config.device)
        self.device = self.info.device
        self.out_dir = Path(config.out_dir)
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(config.to_yaml())
        seed_everything(config.seed)

        if train_stream is None:
            train_stream, val_stream = build_streams(config, self.out_dir, self.info.is_main)
        d = config.data
        self.loader = WindowLoader(
            train_stream,
            seq_len=d.seq_len,
            micro_batch_size=d.micro_batch_size,
            grad_accum=config.grad_accum,
            packing=d.packing,
            sampling=d.sampling,
            seed=d.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        self.val_batches = (
            []
            if val_stream is None
            else evaluation_batches(
                val_stream,
                seq_len=d.seq_len,
                micro_batch_size=d.micro_batch_size,
                max_batches=config.eval_batches,
                packing=d.packing,
                rank=self.info.rank,
                world_size=self.info.world_size,
            )
        )

        if model is None:
            model = build_model(config.model, train_stream.vocab_size)
        self.inner = model.to(self.device)
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.inner)
        self.model = dist_utils.wrap_model(self.inner, config.distributed, self.info)
        # After wrapping: FSDP2 replaces the parameters by sharded ones.
        self.optimizer = build_optimizer(self.inner, config.optim)
        if config.compile:
            self.model = torch.compile(self.model)
        self.schedule = LRSchedule(self.optimizer, config.schedule, config.max_steps)
        self.guard = Guard(config.guard)
        self.grad_monitor = GradientMonitor(config.monitor)
        self.state_monitor = StateMonitor(config.monitor)
        self.aux = AuxiliaryLosses(config.aux, self.inner)
        self.step_modules = step_aware_modules(self.inner)
        self.recovery = Recovery(config.recovery, seed=config.seed, rank=self.info.rank)
        c = config.checkpoint
        self.checkpoints = CheckpointManager(
            self.out_dir / "checkpoints",
            keep_last=c.keep_last,
            max_shard_bytes=c.max_shard_bytes,
            verify=c.verify,
        )
        self.step = 0  # optimizer updates applied to the current weights (a rollback rewinds it)
        self.iteration = 0  # loop iterations, never rewound
        self.best_val: float | None = None
        # Seconds spent in optimizer steps (evaluation, checkpoints and snapshots not counted);
        # what max_seconds limits and what evaluation records carry for equal-wall-time plots.
        self.train_seconds = 0.0
        self.stopped_by_time = False
        self.events: list[dict[str, Any]] = []
        self.flops_per_token = flops_per_token(self.inner, d.seq_len)
        self.peak_flops = config.peak_flops or (
            peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        )
        self.metrics = MetricsWriter(self.out_dir, enabled=False)

    # ---------------------------------------------------------------- the loop
    def fit(self, *, stop_at: int | None = None) -> TrainResult:
        """Train until ``max_steps`` (or ``stop_at``, to end a run early with a checkpoint that
        resumes on the same schedule)."""
        c = self.config
        self.metrics = MetricsWriter(
            self.out_dir,
            enabled=self.info.is_main,
            tensorboard=c.tensorboard,
            progress=c.progress,
            total_steps=c.max_steps,
        )
        self._maybe_resume()
        self._event(
            "start",
            world_size=self.info.world_size,
            device=str(self.device),
            parameters=sum(p.numel() for p in self.inner.parameters()),
            tokens_per_step=self.loader.tokens_per_step,
        )
        self._take_snapshot()
        end = c.max_steps if stop_at is None else min(stop_at, c.max_steps)
        loss = float("nan")
        try:
            while self.step < end:
                started = time.perf_counter()
                lr = self.schedule.apply(self.step)
                batches = self.loader.next_step()
                loss, penalty, aux_terms = self._forward_backward(batches)

                named = named_grads(self.inner)
                if c.monitor.zero_nonfinite_grads:
                    touched = zero_nonfinite_(named)
                    if touched:
                        self._event("zeroed_nonfinite_grads", params=touched)
                grads = [g for _, _, g in named]
                per_param, total = gradient_norms(grads)
                grad_norm = total.item()
                bad = (
                    []
                    if math.isfinite(grad_norm)
                    else [n for (n, _, _), v in zip(named, per_param.tolist()) if not math.isfinite(v)]
                )
                verdict = self.guard.inspect(self.iteration, loss=loss, grad_norm=grad_norm, bad_params=bad)

                if verdict.ok:
                    if self.grad_monitor.due(self.step):
                        self.metrics.report("grad_report", self.grad_monitor.report(self.step, named))
                    if self.grad_monitor.wants_previous(self.step):
                        self.grad_monitor.remember(named)
                    clip_gradients(grads, total, c.max_grad_norm)
                    self.optimizer.step()
                    self.guard.record_good(loss)
                self.optimizer.zero_grad(set_to_none=True)

                if not verdict.ok:
                    self._event(
                        "skipped_step",
                        step=self.step,
                        reason=verdict.reason,
                        message=verdict.message,
                        bad_params=verdict.bad_params[: c.guard.max_names],
                    )
                    if verdict.rollback:
                        self._rollback(verdict.lr_factor, verdict.reason)
                    self.iteration += 1
                    continue

                elapsed = time.perf_counter() - started
                self.train_seconds += elapsed
                self._log_step(loss, penalty, aux_terms, lr, grad_norm, elapsed)
                self.step += 1
                self.iteration += 1
                if self._out_of_time():
                    self.stopped_by_time = True
                    self._event("time_limit", step=self.step, train_seconds=round(self.train_seconds, 3))
                    break
                self._after_step(batches)
            self._finish()
        finally:
            self.metrics.close()
        return TrainResult(self.step, self.iteration, loss, self.best_val, self.out_dir, self.events)

    def _forward_backward(self, batches: list[Batch]) -> tuple[float, float, dict[str, float]]:
        """Forward and backward of every micro-batch; returns (global mean loss, mean penalty,
        {auxiliary term: mean} (with "aux_loss", their weighted sum; empty when aux is off))."""
        c = self.config
        local_targets = sum(b.num_targets for b in batches)
        (global_targets,) = dist_utils.all_reduce_sum([float(local_targets)], self.device)
        weighted_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        weighted_penalty = torch.zeros((), dtype=torch.float64, device=self.device)
        weighted_aux: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            # Every micro-batch sees the same step, so the gate schedule and the memory cadence
            # follow optimizer steps whatever grad_accum (the modules count forward calls).
            set_training_step(self.step_modules, self.step)
            batch = batch.to(self.device)
            # DDP averages gradients over ranks; scaling by world_size makes the update the token
            # mean of the whole global batch.
            weight = batch.num_targets / global_targets * self.info.world_size
            sync = contextlib.nullcontext()
            if i < len(batches) - 1 and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()  # all-reduce once, after the last micro-batch
            with sync:
                with self._autocast():
                    cache = None
                    if c.monitor.state_penalty > 0:
                        cache = self._penalty_cache(batch.input_ids.shape[0])
                    kwargs = {"labels": batch.labels, "cu_seqlens": batch.cu_seqlens}
                    if cache is not None:
                        kwargs["cache"] = cache
                    output = self.model(batch.input_ids, **kwargs)
                    loss = output.loss
                    objective = loss
                    if cache is not None:
                        penalty = state_penalty(cache, c.monitor.state_target).to(loss.device)
                        objective = loss + c.monitor.state_penalty * penalty
                        weighted_penalty += penalty.detach().double() * batch.num_targets
                    if self.aux.enabled:
                        extra, terms = self.aux.compute(output.logits, batch.cu_seqlens)
                        objective = objective + extra.to(loss.device)
                        for name, value in {**terms, "aux_loss": extra.detach()}.items():
                            value = value.double().to(self.device) * batch.num_targets
                            weighted_aux[name] = weighted_aux.get(name, 0.0) + value
                (objective.float() * weight).backward()
            weighted_loss += loss.detach().double() * batch.num_targets
        names = sorted(weighted_aux)  # the same on every rank: the same model reports the same terms
        local = torch.stack([weighted_loss, weighted_penalty, *(weighted_aux[n] for n in names)])
        summed = dist_utils.all_reduce_sum(local.tolist(), self.device)  # one host sync for all
        aux = {name: value / global_targets for name, value in zip(names, summed[2:])}
        return summed[0] / global_targets, summed[1] / global_targets, aux

    def _penalty_cache(self, batch: int) -> Any:
        """An inference cache for the state penalty. Under bf16 autocast its activation states
        (conv windows, KV) must be bf16 like the activations they meet (the conv kernel refuses a
        fp32 initial state for bf16 input); the layers keep their SSM states fp32 whatever dtype."""
        allocate = self.inner.allocate_cache
        if self.config.precision == "bf16" and "dtype" in inspect.signature(allocate).parameters:
            return allocate(batch, dtype=torch.bfloat16)
        return allocate(batch)

    def _autocast(self):
        if self.config.precision == "bf16":
            # Parameters, gradients and optimizer state stay fp32 (master weights); matmuls run in bf16.
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _after_step(self, batches: list[Batch]) -> None:
        """Periodic work after an applied step (``self.step`` already counts it)."""
        c = self.config
        step = self.step
        if self.guard.wants_snapshot(step):
            self._take_snapshot()
        if self.state_monitor.due(step):
            rows = batches[0].input_ids.reshape(-1, c.data.seq_len).to(self.device)
            # In eval mode: a probe is no training call, so it must not advance step-counting
            # modules or write GroundedMamba's memory bank. In fp32 (no autocast): the monitor's
            # cache is fp32, which a bf16 Mamba-2 forward refuses, and the norms are more exact.
            was_training = self.inner.training
            self.inner.eval()
            try:
                report = self.state_monitor.measure(self.inner, rows)
            finally:
                self.inner.train(was_training)
            if report is not None:
                self.metrics.report("state", {"step": step, **report})
                if report["nonfinite"]:
                    self._event("state_nonfinite", step=step, layers=report["nonfinite"])
                if report["warnings"]:
                    self._event("state_norm_warning", step=step, layers=report["warnings"])
        if self.recovery.due(step):
            for event in self.recovery.step(step, self.inner, self.optimizer):
                self._event(event.pop("event"), step=step, **event)
        saved = None
        if c.eval_every > 0 and step % c.eval_every == 0 and step < c.max_steps:
            saved = self._evaluate_and_maybe_promote()
        if c.checkpoint.every > 0 and step % c.checkpoint.every == 0 and step < c.max_steps and saved != step:
            self.save_checkpoint()

    def _out_of_time(self) -> bool:
        """Whether max_seconds is spent; every rank takes rank 0's verdict (their clocks differ)."""
        limit = self.config.max_seconds
        if limit <= 0 or self.step >= self.config.max_steps:
            return False
        verdict = 1.0 if self.info.is_main and self.train_seconds >= limit else 0.0
        return dist_utils.all_reduce_sum([verdict], self.device)[0] > 0

    def _finish(self) -> None:
        c = self.config
        saved = None
        if (self.step >= c.max_steps or self.stopped_by_time) and self.val_batches:
            saved = self._evaluate_and_maybe_promote()
        path = self.save_checkpoint() if saved != self.step else self.checkpoints.step_folder(self.step)
        if c.checkpoint.golden == "final" and c.checkpoint.enabled and self.info.is_main:
            self.checkpoints.promote_golden(path)
            self._event("golden", step=self.step, source=path.name)
        dist_utils.barrier()
        if self.info.is_main and c.plots:
            self.metrics.close()
            written = make_plots(self.out_dir / LOG_FILE, self.out_dir / "plots")
            logger.info("plots: %s", ", ".join(str(p) for p in written))

    # ---------------------------------------------------------------- logging
    def _event(self, name: str, **fields: Any) -> None:
        record = {"event": name, "iter": self.iteration, **fields}
        self.events.append(record)
        self.metrics.event(record)
        level = (
            logging.INFO
            if name in ("start", "checkpoint", "golden", "resume", "time_limit")
            else logging.WARNING
        )
        if self.info.is_main:
            logger.log(level, "%s: %s", name, {k: v for k, v in fields.items()})

    def _log_step(
        self, loss: float, penalty: float, aux: dict[str, float], lr: float, grad_norm: float, elapsed: float
    ) -> None:
        if self.step % self.config.log_every != 0:
            return
        tokens_per_s = self.loader.tokens_per_step / elapsed if elapsed > 0 else float("nan")
        record = {
            "step": self.step,
            "iter": self.iteration,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed,
            "memory_gb": memory_gb(self.device),
        }
        if self.peak_flops:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.info.world_size)
        if self.config.monitor.state_penalty > 0:
            record["state_penalty"] = penalty
        # Each auxiliary term (weighted or not) as aux_<name>; aux_loss is their weighted sum.
        record.update({name if name == "aux_loss" else f"aux_{name}": value for name, value in aux.items()})
        self.metrics.step(record)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-mean validation loss over the fixed validation batches (all ranks)."""
        was_training = self.model.training
        self.model.eval()
        total = count = 0.0
        for batch in self.val_batches:
            batch = batch.to(self.device)
            with self._autocast():
                loss = self.model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens).loss
            total += loss.double().item() * batch.num_targets
            count += batch.num_targets
        self.model.train(was_training)
        total, count = dist_utils.all_reduce_sum([total, count], self.device)
        return total / count if count else float("nan")

    def _evaluate_and_maybe_promote(self) -> int | None:
        """Evaluate; with golden=best_val, save and promote a checkpoint when the loss improved.
        Returns the step saved, if any."""
        if not self.val_batches:
            return None
        val_loss = self.evaluate()
        self.metrics.eval(self.step, {"val_loss": val_loss, "train_seconds": self.train_seconds})
        if self.info.is_main:
            logger.info("step %d: validation loss %.4f", self.step, val_loss)
        improved = math.isfinite(val_loss) and (self.best_val is None or val_loss < self.best_val)
        if improved:
            self.best_val = val_loss
        if improved and self.config.checkpoint.golden == "best_val" and self.config.checkpoint.enabled:
            path = self.save_checkpoint()
            if self.info.is_main:
                self.checkpoints.promote_golden(path)
                self._event("golden", step=self.step, val_loss=val_loss, source=path.name)
            dist_utils.barrier()
            return self.step
        return None

    # ---------------------------------------------------------------- snapshots and rollback
    def _extra_state(self) -> dict[str, Any]:
        return {
            "rng": get_rng_state(),
            "data": self.loader.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def _take_snapshot(self) -> None:
        if self.config.guard.enabled:
            self.guard.add_snapshot(
                capture_snapshot(self.step, self.inner, self.optimizer, self._extra_state())
            )

    def _rollback(self, lr_factor: float, reason: str | None) -> None:
        snapshot = self.guard.rollback_target()
        from_step = self.step
        restore_snapshot(snapshot, self.inner, self.optimizer)
        set_rng_state(snapshot.extra["rng"])
        if self.config.guard.replay_data:
            self.loader.load_state_dict(snapshot.extra["data"])
        self.schedule.scale *= lr_factor
        self.step = snapshot.step
        self._event(
            "rollback",
            reason=reason,
            from_step=from_step,
            to_step=snapshot.step,
            lr_factor=lr_factor,
            lr_scale=self.schedule.scale,
            rollbacks=self.guard.rollbacks,
            data="replayed" if self.config.guard.replay_data else "skipped ahead",
        )

    # ---------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "iteration": self.iteration,
            "data": self.loader.state_dict(),
            "schedule": self.schedule.state_dict(),
            "guard": self.guard.state_dict(),
            "best_val": self.best_val,
            "train_seconds": self.train_seconds,
            "world_size": self.info.world_size,
            "rng": dist_utils.all_gather_object(get_rng_state()),
        }

    def save_checkpoint(self) -> Path:
        """Save ``step-N`` (every rank takes part in gathering; rank 0 writes)."""
        if not self.config.checkpoint.enabled:
            return self.checkpoints.step_folder(self.step)
        model_state = gather_model_state(self.inner)
        opt_tensors, opt_meta = gather_optimizer_state(self.optimizer)
        trainer_state = self._trainer_state()
        path = self.checkpoints.step_folder(self.step)
        if self.info.is_main:
            model_config = getattr(self.inner, "config", None)
            metadata = {
                "step": self.step,
                "parameters": sum(t.numel() for t in model_state.values()),
                "dtype": str(next(iter(model_state.values())).dtype).replace("torch.", ""),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "ssmkit_version": ssmkit.__version__,
                "torch_version": torch.__version__,
                "world_size": self.info.world_size,
                "model_config": model_config.to_dict() if hasattr(model_config, "to_dict") else None,
            }
            path = self.checkpoints.save(
                self.step,
                model_state=model_state,
                optimizer_state=opt_tensors,
                optimizer_meta=opt_meta,
                trainer_state=trainer_state,
                config_yaml=self.config.to_yaml(),
                metadata=metadata,
            )
            self._event("checkpoint", step=self.step, path=str(path))
        dist_utils.barrier()
        return path

    def _maybe_resume(self) -> None:
        resume = self.config.checkpoint.resume
        if not resume:
            return
        checkpoint: Checkpoint | None
        if resume == "auto":
            # Rank 0 chooses, so that every rank resumes from the same folder.
            chosen = None
            if self.info.is_main:
                self.checkpoints.remove_stale_temporaries()
                found = self.checkpoints.load_latest()
                chosen = None if found is None else str(found.path)
            chosen = dist_utils.broadcast_object(chosen)
            if chosen is None:
                logger.info("resume=auto: no checkpoint in %s, starting from scratch", self.checkpoints.root)
                return
            checkpoint = load_checkpoint(chosen, verify=self.config.checkpoint.verify)
        else:
            checkpoint = load_checkpoint(resume, verify=self.config.checkpoint.verify)
        self.restore(checkpoint)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load weights, optimizer state, data position, schedule, guard and RNG from a checkpoint."""
        load_model_state(self.inner, checkpoint.model_state)
        load_optimizer_state(self.optimizer, checkpoint.optimizer_state)
        state = checkpoint.trainer_state
        self.step = int(state["step"])
        self.iteration = int(state["iteration"])
        self.loader.load_state_dict(state["data"])
        self.schedule.load_state_dict(state["schedule"])
        self.guard.load_state_dict(state["guard"])
        self.best_val = state.get("best_val")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        rng_states = state["rng"]
        if len(rng_states) == self.info.world_size:
            set_rng_state(rng_states[self.info.rank])
        else:
            # Another world size: the saved per-rank streams cannot be matched one to one.
            seed_everything(self.config.seed + 1000003 * self.step + self.info.rank)
            logger.warning(
                "checkpoint was saved by %d ranks, resuming with %d: RNG streams reseeded",
                len(rng_states),
                self.info.world_size,
            )
        self._event("resume", step=self.step, path=str(checkpoint.path))


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Build a :class:`Trainer` and run it."""
    return Trainer(copy.deepcopy(config), **kwargs).fit()


__all__ = ["CheckpointError", "TrainResult", "Trainer", "build_model", "build_streams", "train"]
