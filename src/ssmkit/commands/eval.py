"""``ssmkit eval TASK``: the synthetic tasks, perplexity and long-context stability.

- ``ssmkit eval selective-copying|induction-heads|mqar [--config FILE] [key=value ...]``: train the
  task's models (defaults: CPU sizes; ``configs/tasks/*-paper.yaml``: the paper's), print the
  accuracy table, write ``results.json`` and ``accuracy.png`` to ``--out``.
- ``ssmkit eval perplexity CHECKPOINT_OR_PRESET DATA``: loss, perplexity, bits per token, byte and
  character, streaming through the cache or with sliding windows.
- ``ssmkit eval long-context [CHECKPOINT_OR_PRESET]``: stream 1k .. 1M tokens through the cache;
  loss, tokens/s, state norms and drift per layer, peak memory, flat-memory verdict, context shifts.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

TASKS = ("selective-copying", "induction-heads", "mqar")

# --smoke: a seconds-long run that exercises the whole pipeline (training, scoring, table, JSON,
# plot); far too short to learn the tasks.
SMOKE_OVERRIDES = {
    "selective-copying": [
        "seqlen=32",
        "num_tokens=4",
        "train.steps=4",
        "train.batch_size=4",
        "train.eval_every=2",
    ],
    "induction-heads": [
        "seqlen=32",
        "train.steps=4",
        "train.batch_size=4",
        "train.eval_every=2",
        "max_test_length=128",
        "eval_chunk=64",
        "attention_max_length=64",
        "test_sequences=16",
    ],
    "mqar": ["seqlens=[32]", "d_models=[16]", "vocab_size=64", "train.steps=4", "train.batch_size=4"],
}
for _task in TASKS:
    SMOKE_OVERRIDES[_task] += [
        "train.eval_batches=1",
        "train.eval_batch_size=4",
        "train.schedule.warmup_steps=1",
    ]

logger = logging.getLogger("ssmkit.eval")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="synthetic tasks (selective copying, induction heads, MQAR), perplexity, long context"
    )
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for task in TASKS:
        sub = tasks.add_parser(task, help=f"train and score the {task} models; table, JSON and PNG")
        sub.add_argument(
            "--config",
            default=None,
            help=f"YAML config (e.g. configs/tasks/{task}.yaml); defaults apply when omitted",
        )
        sub.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="config overrides, e.g. train.steps=200 seqlen=512",
        )
        sub.add_argument(
            "--out", default=f"runs/eval/{task}", help="folder for results.json and accuracy.png"
        )
        sub.add_argument("--device", default=None, help="auto, cpu or cuda (overrides the config)")
        sub.add_argument(
            "--smoke", action="store_true", help="a seconds-long pipeline check (does not learn the task)"
        )
        sub.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
        sub.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
        sub.set_defaults(func=run_task, task_name=task)

    ppl = tasks.add_parser(
        "perplexity", help="perplexity and bits per byte/char of a model on a text or token file"
    )
    ppl.add_argument("model", metavar="CHECKPOINT_OR_PRESET")
    ppl.add_argument("data", metavar="DATA", help="UTF-8 text file, or .npy/.bin token file")
    ppl.add_argument("--mode", choices=("streaming", "sliding"), default="streaming")
    ppl.add_argument("--chunk", type=int, default=1024, help="streaming: tokens per call through the cache")
    ppl.add_argument("--context", type=int, default=1024, help="sliding: window length")
    ppl.add_argument("--stride", type=int, default=512, help="sliding: window step")
    ppl.add_argument(
        "--tokenizer",
        default=None,
        help="'byte', 'char' (built from DATA) or a tokenizer folder (default: the model's, else byte)",
    )
    ppl.add_argument(
        "--tail", type=float, default=None, help="score only the last fraction of DATA (e.g. 0.1)"
    )
    ppl.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    _common_model_args(ppl)
    ppl.set_defaults(func=run_perplexity)

    lc = tasks.add_parser(
        "long-context", help="stream long inputs through the cache: stability, speed, memory"
    )
    lc.add_argument("model", metavar="CHECKPOINT_OR_PRESET", nargs="?", default="tiny-mamba2")
    lc.add_argument(
        "--lengths",
        default=None,
        help="comma-separated lengths, k/M suffixes allowed "
        "(default: 1k,4k,16k on CPU; 1k,4k,16k,64k,256k,1M on CUDA)",
    )
    lc.add_argument("--chunk", type=int, default=512, help="tokens per call through the cache")
    lc.add_argument(
        "--data", default=None, help="text or token file to stream (cycled); default: random tokens"
    )
    lc.add_argument("--tokenizer", default=None, help="as for perplexity")
    lc.add_argument(
        "--shift-threshold", type=float, default=0.8, help="cosine below which a context shift is reported"
    )
    lc.add_argument(
        "--reset-on-shift", action="store_true", help="reset the state when a context shift is detected"
    )
    lc.add_argument(
        "--out", default="runs/eval/long-context", help="folder for results.json and long_context.png"
    )
    _common_model_args(lc)
    lc.set_defaults(func=run_long_context)


def _common_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of a preset")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


THREADS_HELP = (
    "CPU threads for torch (default: torch's choice); 1 is much faster on a CPU shared with other jobs, "
    "where spinning worker threads wait on each other"
)


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _console():
    from rich.console import Console

    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns there).
    return Console(width=max(Console().width, 150))


def _write_json(path: Path, data: Any) -> None:
    from ssmkit.models.config import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------- synthetic tasks
class _TaskProgress:
    """A rich progress bar per trained model: loss, tokens/s, latest held-out accuracy."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        self.bars: dict[str, Any] = {}
        self.accuracy: dict[str, float] = {}
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )

    def __enter__(self) -> _TaskProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind, run = event["kind"], event["run"]
        if kind == "eval":
            self.accuracy[run] = event["accuracy"]
            # Without a bar, the periodic accuracy is the only sign of progress: log it at INFO.
            level = logging.DEBUG if self.progress is not None else logging.INFO
            logger.log(level, "%s step %d: held-out accuracy %.4f", run, event["step"], event["accuracy"])
        elif kind == "done":
            logger.info("%s: accuracy %.2f%% after %.0f s", run, 100 * event["accuracy"], event["seconds"])
        elif kind == "test_length":
            logger.info("%s at length %d: accuracy %.2f%%", run, event["length"], 100 * event["accuracy"])
        if self.progress is None:
            return
        if kind == "start":
            self.bars[run] = self.progress.add_task(
                run, total=event["total"], info=f"{event['parameters']:,} params"
            )
        elif kind == "step":
            info = f"loss {event['loss']:.3f}  {event['tokens_per_s']:,.0f} tok/s"
            if run in self.accuracy:
                info += f"  acc {100 * self.accuracy[run]:.1f}%"
            self.progress.update(self.bars[run], completed=event["step"], info=info)


def _task_table(results: dict[str, Any]):
    from rich.table import Table

    task = results["task"]
    if task == "induction-heads":
        table = Table(
            title=f"Induction heads: accuracy by test length (trained at {results['config']['seqlen']})"
        )
        table.add_column("model")
        table.add_column("params", justify="right")
        for length in results["lengths"]:
            table.add_column(_short(length), justify="right")
        for row in results["rows"]:
            cells = [("-" if v is None else f"{100 * v:.1f}") for v in row["by_length"].values()]
            table.add_row(row["label"], f"{row['parameters']:,}", *cells)
        return table
    if task == "mqar":
        table = Table(title="Multi-query associative recall: accuracy (%)")
        columns = ("model", "d_model", "seqlen", "pairs", "params", "accuracy", "by query order")
        for column in (*columns, "final loss", "time"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in results["rows"]:
            table.add_row(
                row["model"],
                str(row["d_model"]),
                str(row["seqlen"]),
                str(row["num_pairs"]),
                f"{row['parameters']:,}",
                f"{100 * row['accuracy']:.1f}",
                _query_orders(row.get("by_query_order")),
                f"{row['final_loss']:.3f}",
                f"{row['seconds']:.0f} s",
            )
        return table
    config = results["config"]
    table = Table(
        title=f"Selective copying: {config['num_tokens']} tokens in a context of {config['seqlen']} "
        f"(vocabulary {config['vocab_data']})"
    )
    for column in ("model", "params", "steps", "accuracy", "final loss", "time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in results["rows"]:
        table.add_row(
            row["label"],
            f"{row['parameters']:,}",
            str(row["steps"]),
            f"{100 * row['accuracy']:.1f}%",
            f"{row['final_loss']:.3f}",
            f"{row['seconds']:.0f} s",
        )
    return table


def _query_orders(accuracies: list[float] | None) -> str:
    """First, second, third and last query's accuracy (%), e.g. "26 37 ... 100"."""
    if not accuracies:
        return "-"
    shown = accuracies if len(accuracies) <= 4 else [*accuracies[:3], None, accuracies[-1]]
    return " ".join("..." if a is None else f"{100 * a:.0f}" for a in shown)


def _short(length: int) -> str:
    exponent = length.bit_length() - 1
    return f"2^{exponent}" if length == 1 << exponent else str(length)


def run_synthetic_task(task: str, config: Any, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train and score ``task`` with ``config`` (a :mod:`ssmkit.evaluation.tasks` config), showing a
    progress bar; print the table; write ``results.json`` and ``accuracy.png`` to ``out``. Returns the
    results dict with ``"json"`` and ``"plot"`` (the paths written) added. Used by ``ssmkit eval TASK``
    and by ``ssmkit demo``."""
    from ssmkit.evaluation import plots
    from ssmkit.evaluation.tasks import EXPERIMENTS

    with _TaskProgress(enabled=progress) as bars:
        results = EXPERIMENTS[task](config, callback=bars)
    console = _console()
    console.print(_task_table(results))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", results)
    if task == "selective-copying":
        size = f"{config.num_tokens} tokens in a context of {config.seqlen}"
        plot = plots.plot_training_accuracy(
            results, out / "accuracy.png", title=f"Selective copying ({size}): held-out accuracy"
        )
    elif task == "induction-heads":
        plot = plots.plot_induction_heads(results, out / "accuracy.png")
    else:
        plot = plots.plot_mqar(results, out / "accuracy.png")
    return {**results, "json": str(out / "results.json"), "plot": str(plot)}


def run_task(args: argparse.Namespace) -> int:
    from ssmkit.evaluation.tasks import load_task_config

    set_threads(args.threads)
    task = args.task_name
    overrides = (SMOKE_OVERRIDES[task] if args.smoke else []) + list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    config = load_task_config(task, args.config, overrides)
    results = run_synthetic_task(task, config, Path(args.out), progress=not args.no_progress)
    _console().print(f"results: {results['json']}, plot: {results['plot']}")
    return 0


# ---------------------------------------------------------------- perplexity
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tokenizer(spec: str | None, loaded: Any, data: str | None):
    """The tokenizer: an explicit --tokenizer, else the model's saved one, else UTF-8 bytes."""
    from ssmkit.data import CharTokenizer, load_tokenizer
    from ssmkit.evaluation.perplexity import ByteTokenizer

    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        if data is None or Path(data).suffix in (".npy", ".bin"):
            raise SystemExit("--tokenizer char builds the vocabulary from a text DATA file")
        return CharTokenizer.train(Path(data).read_text(encoding="utf-8"))
    if spec is not None:
        return load_tokenizer(spec)
    if loaded.tokenizer_folder is not None:
        return load_tokenizer(loaded.tokenizer_folder)
    logger.info("no tokenizer saved with %s: using UTF-8 bytes (vocabulary 256)", loaded.source)
    return ByteTokenizer()


def run_perplexity(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from ssmkit.evaluation.loading import load_model
    from ssmkit.evaluation.perplexity import evaluate_perplexity, load_tokens

    set_threads(args.threads)
    loaded = load_model(
        args.model, device=_device(args.device), dtype=getattr(torch, args.dtype), seed=args.seed
    )
    tokenizer = _tokenizer(args.tokenizer, loaded, args.data)
    tokens = load_tokens(args.data, tokenizer, tail=args.tail, max_tokens=args.max_tokens)
    result = evaluate_perplexity(
        loaded.model,
        tokens,
        mode=args.mode,
        context=args.context,
        stride=args.stride,
        chunk=args.chunk,
        decode=tokenizer.decode if tokenizer is not None else None,
    )
    table = Table(title=f"Perplexity of {loaded.source} on {args.data} ({result.mode})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("tokens scored", f"{result.tokens:,}"),
        (
            "bytes / characters scored",
            f"{result.bytes:,} / {result.chars:,}" if result.bytes is not None else "-",
        ),
        ("loss (nats/token)", f"{result.loss:.4f}"),
        ("perplexity", f"{result.perplexity:.3f}"),
        ("bits per token", f"{result.bits_per_token:.4f}"),
        ("bits per byte", "-" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}"),
        ("bits per character", "-" if result.bits_per_char is None else f"{result.bits_per_char:.4f}"),
        (
            "window",
            f"chunks of {result.chunk}"
            if result.mode == "streaming"
            else f"context {result.context}, stride {result.stride}",
        ),
        ("tokens/s", f"{result.tokens_per_s:,.0f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    _console().print(table)
    if args.json:
        _write_json(Path(args.json), {"model": loaded.source, "data": args.data, **result.to_dict()})
    return 0


# ---------------------------------------------------------------- long context
def parse_lengths(text: str) -> list[int]:
    """ "1k,4k,1M" -> [1024, 4096, 1048576]."""
    lengths = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        scale = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20}.get(part[-1], 1)
        digits = part[:-1] if scale > 1 else part
        try:
            value = int(digits) * scale
        except ValueError:
            raise SystemExit(f"--lengths must be integers with optional k/M suffixes, got {part!r}") from None
        if value < 2:
            raise SystemExit(f"--lengths must be >= 2, got {part!r}")
        lengths.append(value)
    if not lengths:
        raise SystemExit("--lengths is empty")
    return lengths


def run_long_context(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from ssmkit.evaluation import plots
    from ssmkit.evaluation.loading import load_model
    from ssmkit.evaluation.long_context import cycle_tokens, run_long_context, synthetic_tokens
    from ssmkit.evaluation.perplexity import load_tokens

    set_threads(args.threads)
    device = _device(args.device)
    loaded = load_model(args.model, device=device, dtype=getattr(torch, args.dtype), seed=args.seed)
    model = loaded.model
    if args.lengths:
        lengths = parse_lengths(args.lengths)
    else:
        lengths = [1 << 10, 1 << 12, 1 << 14] + ([1 << 16, 1 << 18, 1 << 20] if device.type == "cuda" else [])
    if args.data:
        ids = load_tokens(args.data, _tokenizer(args.tokenizer, loaded, args.data))
        source = lambda length: cycle_tokens(ids, length)
    else:
        vocab = model.config.vocab_size
        source = lambda length: synthetic_tokens(length, vocab, seed=args.seed)

    console = _console()

    def report(r) -> None:
        console.print(f"streamed {r.length:,} tokens: loss {r.loss:.3f}, {r.tokens_per_s:,.0f} tok/s")

    results = run_long_context(
        model,
        source,
        lengths=lengths,
        chunk=args.chunk,
        shift_threshold=args.shift_threshold,
        reset_on_shift=args.reset_on_shift,
        callback=report,
    )
    results["model"] = loaded.source
    table = Table(title=f"Long context: {loaded.source} on {results['device']} (chunks of {args.chunk})")
    for column in (
        "length",
        "loss",
        "ppl",
        "tok/s",
        "peak MiB",
        "cache KiB",
        "state norm mean/max per layer",
        "drift max / last",
        "shifts",
    ):
        table.add_column(column, justify="left" if column.startswith("state") else "right")
    for r in results["reports"]:
        norms = " ".join(f"L{x['layer']}:{x['mean']:.3g}/{x['max']:.3g}" for x in r["layers"]) or "-"
        drift = max((x["drift_max"] for x in r["layers"]), default=0.0)
        last = max((x["drift_last"] for x in r["layers"]), default=0.0)
        table.add_row(
            f"{r['length']:,}",
            f"{r['loss']:.3f}",
            f"{r['perplexity']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['cache_bytes'] / 1024:.1f}",
            norms,
            f"{drift:.2e} / {last:.2e}",
            str(len(r["shifts"])),
        )
    console.print(table)
    memory = results["memory"]
    failed = False
    if memory is not None:
        verdict = "[green]flat[/green]" if memory["flat"] else "[red]grows[/red]"
        console.print(
            f"memory {verdict}: {memory['short_length']:,} -> {memory['long_length']:,} tokens, peak "
            f"{memory['peak_growth']:+.1%}, cache x{memory['cache_growth']:.2f}"
        )
        failed = not memory["flat"]
    finite = all(r["finite"] for r in results["reports"])
    if not finite:
        console.print("[red]non-finite loss or state norms[/red]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", results)
    plot = plots.plot_long_context(results, out / "long_context.png")
    if args.json:
        _write_json(Path(args.json), results)
    console.print(f"results: {out / 'results.json'}, plot: {plot}")
    return 1 if failed or not finite else 0
