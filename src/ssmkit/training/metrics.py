"""Where training metrics go: a JSONL log, TensorBoard scalars, a rich progress bar, PNG plots.

Only rank 0 creates a :class:`MetricsWriter` with ``enabled=True``; the others get a disabled
one, so no other rank ever writes a file. Every line of ``log.jsonl`` is a JSON object with a
``type``: ``"step"`` (loss, lr, grad_norm, tokens_per_s, mfu, memory_gb, ...), ``"eval"``,
``"event"`` (guard, recovery, checkpoint: what happened and why), ``"grad_report"`` or
``"state"``. Lines are flushed as they are written so a crash loses nothing already logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """JSONL + TensorBoard + progress bar for one run (a no-op when ``enabled`` is False)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        total_steps: int = 0,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._file = None
        self._tb = None
        self._progress = None
        self._task = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / LOG_FILE, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError as err:
                logger.warning("TensorBoard scalars are skipped: %s (pip install tensorboard)", err)
                self.event({"event": "tensorboard_unavailable", "error": str(err)})
        if progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_clean(record)) + "\n")

    def step(self, record: dict[str, Any]) -> None:
        """One optimizer step's metrics (``step`` is required)."""
        if not self.enabled:
            return
        self._write({"type": "step", "time": time.time(), **record})
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
        if self._progress is not None:
            info = f"loss {record.get('loss', float('nan')):.4f}"
            if record.get("tokens_per_s"):
                info += f"  {record['tokens_per_s']:,.0f} tok/s"
            self._progress.update(self._task, completed=record["step"] + 1, info=info)

    def eval(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"type": "eval", "step": step, **values})
        if self._tb is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"eval/{key}", value, step)

    def event(self, record: dict[str, Any]) -> None:
        """Something the run did or suffered (``event`` names it); also logged through ``logging``."""
        if not self.enabled:
            return
        self._write({"type": "event", "time": time.time(), **record})

    def report(self, kind: str, record: dict[str, Any]) -> None:
        """A bulkier report (``grad_report``, ``state``) kept in the JSONL log."""
        if not self.enabled:
            return
        self._write({"type": kind, **record})
        if self._tb is not None and kind == "state":
            for layer, norms in record.get("layers", {}).items():
                for key, value in norms.items():
                    if math.isfinite(value):
                        self._tb.add_scalar(f"state/layer{layer}_{key}", value, record["step"])
        if self._tb is not None and kind == "grad_report":
            self._tb.add_scalar("grad/pathology_score", record["score"], record["step"])

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (a half-written last line, from a crash, is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def make_plots(log_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """PNG plots of a run's log: loss (train and validation), learning rate, gradient norm, and SSM
    state norms per layer when they were measured. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r for r in records if r.get("type") == "step"]
    evals = [r for r in records if r.get("type") == "eval"]
    states = [r for r in records if r.get("type") == "state"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def number(value: Any) -> float:
        return float(value) if isinstance(value, (int, float, str)) else float("nan")

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if steps:
        # Plot against the iteration counter: after a rollback the step goes back, iterations do not.
        x = [r.get("iter", r["step"]) for r in steps]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(x, [number(r.get("loss")) for r in steps], label="train", linewidth=1)
        if evals:
            step_to_iter = {r["step"]: r.get("iter", r["step"]) for r in steps}
            ax.plot(
                [step_to_iter.get(r["step"], r["step"]) for r in evals],
                [number(r.get("val_loss")) for r in evals],
                "o-",
                label="validation",
            )
        ax.set_xlabel("iteration (optimizer steps, including skipped ones)")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.set_title("Loss")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "loss.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(x, [number(r.get("grad_norm")) for r in steps], linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("gradient L2 norm (before clipping)")
        ax.set_title("Gradient norm")
        ax.grid(alpha=0.3)
        save(fig, "grad_norm.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(x, [number(r.get("lr")) for r in steps], linewidth=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate (peak group)")
        ax.set_title("Learning rate")
        ax.grid(alpha=0.3)
        save(fig, "lr.png")

    if states:
        fig, ax = plt.subplots(figsize=(7, 4))
        layers = sorted({int(k) for r in states for k in r.get("layers", {})})
        for layer in layers:
            pts = [(r["step"], r["layers"][str(layer)]) for r in states if str(layer) in r.get("layers", {})]
            ax.plot([p[0] for p in pts], [number(p[1]["mean"]) for p in pts], label=f"layer {layer} mean")
            ax.plot([p[0] for p in pts], [number(p[1]["max"]) for p in pts], "--", label=f"layer {layer} max")
        ax.set_xlabel("step")
        ax.set_ylabel("SSM state L2 norm per unit")
        ax.set_title("SSM state norms")
        ax.legend(fontsize="small", ncol=2)
        ax.grid(alpha=0.3)
        save(fig, "state_norms.png")
    return written
