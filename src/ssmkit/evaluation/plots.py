"""PNG plots of evaluation results (matplotlib, headless), one function per result kind.

Each takes the dict returned by the experiment (``ssmkit.evaluation.tasks``) or by
``ssmkit.evaluation.long_context.run_long_context`` and writes one PNG with labelled axes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_training_accuracy(results: dict[str, Any], path: str | os.PathLike, *, title: str) -> Path:
    """Held-out answer accuracy against training step, one line per row (selective copying), and the
    chance level when the config names the data vocabulary (``vocab_data``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in results["rows"]:
        steps = [p[0] for p in row["curve"]]
        acc = [100 * p[1] for p in row["curve"]]
        ax.plot(
            steps,
            acc,
            "o-",
            label=f"{row['label']} ({row['parameters']:,} params): {100 * row['accuracy']:.1f}%",
        )
    vocab = results.get("config", {}).get("vocab_data")
    if vocab:  # guessing one of the data tokens uniformly
        ax.axhline(
            100 / vocab, color="grey", linestyle=":", linewidth=1, label=f"chance ({100 / vocab:.2f}%)"
        )
    ax.set_xlabel("training step (optimizer updates)")
    ax.set_ylabel("answer accuracy on held-out sequences (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_induction_heads(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Accuracy against test length (log2 axis), training length marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in results["rows"]:
        points = [(int(k), v) for k, v in row["by_length"].items() if v is not None]
        points.sort()
        ax.plot(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            "o-",
            label=f"{row['label']} ({row['parameters']:,} params)",
        )
    train_len = results["config"]["seqlen"]
    ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test sequence length (tokens, log2 scale)")
    ax.set_ylabel("accuracy of the recalled token (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Induction heads: length extrapolation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_mqar(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """One panel per sequence length: accuracy against model width, one line per model."""
    plt = _pyplot()
    seqlens = sorted({row["seqlen"] for row in results["rows"]})
    fig, axes = plt.subplots(1, len(seqlens), figsize=(4 * len(seqlens), 3.8), squeeze=False, sharey=True)
    for ax, seqlen in zip(axes[0], seqlens):
        rows = [r for r in results["rows"] if r["seqlen"] == seqlen]
        for model in dict.fromkeys(r["model"] for r in rows):
            points = sorted((r["d_model"], r["accuracy"]) for r in rows if r["model"] == model)
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=model)
        pairs = rows[0]["num_pairs"]
        ax.set_title(f"sequence length {seqlen} ({pairs} key-value pairs)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model dimension d_model (log2 scale)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall accuracy (%)")
    axes[0][0].set_ylim(-2, 102)
    axes[0][-1].legend(fontsize="small")
    fig.suptitle("Multi-query associative recall")
    return _save(fig, path)


def plot_long_context(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Three panels against stream length: loss, tokens/s and peak memory; state norms per layer."""
    plt = _pyplot()
    reports = results["reports"]
    lengths = [r["length"] for r in reports]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(lengths, [r["loss"] for r in reports], "o-")
    axes[0].set_ylabel("loss (nats/token)")
    axes[1].plot(lengths, [r["tokens_per_s"] for r in reports], "o-")
    axes[1].set_ylabel("throughput (tokens/s)")
    axes[2].plot(lengths, [r["peak_memory_bytes"] / 2**20 for r in reports], "o-", label="peak")
    axes[2].plot(lengths, [r["cache_bytes"] / 2**20 for r in reports], "s--", label="cache")
    axes[2].set_ylabel("memory (MiB)")
    axes[2].legend(fontsize="small")
    layers = sorted({layer["layer"] for r in reports for layer in r["layers"]})
    for index in layers:
        values = [next((x for x in r["layers"] if x["layer"] == index), None) for r in reports]
        axes[3].plot(
            lengths, [v["mean"] if v else float("nan") for v in values], "o-", label=f"layer {index} mean"
        )
        axes[3].plot(
            lengths, [v["max"] if v else float("nan") for v in values], "x:", label=f"layer {index} max"
        )
    axes[3].set_ylabel("SSM state L2 norm per unit")
    if layers:
        axes[3].legend(fontsize="x-small", ncol=2)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("streamed length (tokens, log2 scale)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Long-context streaming ({results['device']}, chunks of {results['chunk']} tokens)")
    return _save(fig, path)
