"""Training throughput: tokens/s and MFU of presets against a same-size Transformer, one run.

``python -m ssmkit.training.bench --presets mamba-130m,mamba2-130m --seqlen 2048,8192`` (or
``ssmkit train --bench ...``) trains each preset, and for each a Transformer (every layer
``attention`` with SDPA, followed by a SwiGLU MLP) whose non-embedding parameter count is the
closest one reachable by whole layers, with the same :class:`ssmkit.training.Trainer` loop on
random tokens, bf16 autocast, the same batch in tokens and the same sequence length. The first
``--warmup`` steps (allocation, Triton compilation, autotuning) are not timed; the median step over
the next ``--steps`` is reported. Extra ``key=value`` arguments override the training config
(e.g. ``device=cuda:1 grad_accum=2``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def transformer_like(preset: str) -> dict[str, Any]:
    """A ``model`` section for a Transformer with about the preset's non-embedding parameters."""
    from ssmkit.models import get_preset, parameter_count

    base = get_preset(preset)
    d = base.d_model
    heads = max(1, d // 64)
    d_ff = 64 * round(8 * d / 3 / 64)  # SwiGLU width with the parameters of a 4d GELU MLP

    def model_section(n_layer: int) -> dict[str, Any]:
        return {
            "preset": preset,
            "n_layer": n_layer,
            "layer_types": ["attention"] * n_layer,
            "attention": {"num_heads": heads, "num_kv_heads": heads, "head_dim": d // heads},
            "mlp": {"d_intermediate": d_ff},
        }

    def non_embedding(section: dict[str, Any]) -> int:
        from ssmkit.models import ModelConfig

        data = base.to_dict()
        for key, value in section.items():
            if key == "preset":
                continue
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        config = ModelConfig.from_dict(data)
        return parameter_count(config) - config.padded_vocab_size * d

    target = parameter_count(base) - base.padded_vocab_size * d
    per_layer = non_embedding(model_section(2)) - non_embedding(model_section(1))
    n_layer = max(1, round(target / per_layer))
    return model_section(n_layer)


def bench_one(
    model_section: dict[str, Any],
    seqlen: int,
    *,
    tokens_per_step: int,
    steps: int,
    warmup: int,
    overrides: list[str],
    out_dir: Path,
) -> dict[str, Any]:
    from ssmkit.models import get_preset
    from ssmkit.training import Trainer, load_config
    from ssmkit.training.metrics import LOG_FILE, read_log

    micro_batch = max(1, tokens_per_step // seqlen)
    vocab = get_preset(model_section["preset"]).vocab_size
    base = [
        f"data.vocab_size={vocab}",
        "data.kind=random",
        f"data.seq_len={seqlen}",
        f"data.micro_batch_size={micro_batch}",
        f"data.num_tokens={4 * micro_batch * seqlen + 1}",
        f"max_steps={warmup + steps}",
        "precision=bf16",
        f"out_dir={out_dir}",
        "checkpoint.enabled=false",
        "plots=false",
        "tensorboard=false",
        "progress=false",
        f"guard.snapshot_every={warmup + steps + 1}",
        "schedule.warmup_steps=1",
    ]
    config = load_config(None, base + list(overrides))
    config.model = model_section
    # Each row's peak memory is its own: free the previous model and restart the allocator's peak.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config)
    result = trainer.fit()
    records = [r for r in read_log(out_dir / LOG_FILE) if r.get("type") == "step" and r["step"] >= warmup]
    times = [r["step_time_s"] for r in records]
    median = statistics.median(times)
    tokens = trainer.loader.tokens_per_step
    row = {
        "model": model_section.get("preset"),
        "layers": "x".join(sorted(set(trainer.inner.config.layer_types))),
        "n_layer": trainer.inner.config.n_layer,
        "parameters": sum(p.numel() for p in trainer.inner.parameters()),
        "seqlen": seqlen,
        "tokens_per_step": tokens,
        "median_step_s": median,
        "tokens_per_s": tokens / median,
        "flops_per_token": trainer.flops_per_token,
        "precision": config.precision,
        "device": str(trainer.device),
        "final_loss": result.final_loss,
        "memory_gb": records[-1]["memory_gb"] if records else None,
    }
    if trainer.peak_flops:
        row["mfu"] = (
            trainer.flops_per_token * row["tokens_per_s"] / (trainer.peak_flops * trainer.info.world_size)
        )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssmkit.training.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--presets", default="mamba-130m,mamba2-130m")
    parser.add_argument("--seqlen", default="2048", help="comma-separated sequence lengths")
    parser.add_argument(
        "--tokens", type=int, default=16384, help="tokens per step (micro-batch rows x seqlen)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-transformer", action="store_true", help="skip the Transformer baselines")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING)

    rows = []
    with tempfile.TemporaryDirectory(prefix="ssmkit-bench-") as tmp:
        for seqlen in (int(s) for s in args.seqlen.split(",")):
            for preset in args.presets.split(","):
                sections = [{"preset": preset}]
                if not args.no_transformer:
                    sections.append(transformer_like(preset))
                for i, section in enumerate(sections):
                    out = Path(tmp) / f"{preset}-{i}-{seqlen}"
                    row = bench_one(
                        section,
                        seqlen,
                        tokens_per_step=args.tokens,
                        steps=args.steps,
                        warmup=args.warmup,
                        overrides=args.overrides,
                        out_dir=out,
                    )
                    row["model"] = preset if i == 0 else f"transformer ~{preset}"
                    rows.append(row)
                    logger.warning("%s", row)
                    if args.json:  # after every row: a run cut short keeps what it measured
                        _write_atomic(Path(args.json), json.dumps(rows, indent=1))
    print_rows(rows)
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def print_rows(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training throughput (same Trainer loop, random tokens)")
    for column in (
        "model",
        "params (M)",
        "seqlen",
        "precision",
        "tokens/s",
        "MFU",
        "step (ms)",
        "memory (GB)",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        table.add_row(
            r["model"],
            f"{r['parameters'] / 1e6:.1f}",
            str(r["seqlen"]),
            r["precision"],
            f"{r['tokens_per_s']:,.0f}",
            mfu,
            f"{1000 * r['median_step_s']:.1f}",
            "n/a" if r.get("memory_gb") is None else f"{r['memory_gb']:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
