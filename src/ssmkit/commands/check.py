"""``ssmkit check CHECKPOINT_OR_PRESET``: the production checklist as a pass/fail table with the
measured figure behind every line; the exit status is 1 when any line fails."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="production checklist: reset, memory, determinism, edge cases, dtypes, seeds; exit 1 on failure",
    )
    parser.add_argument(
        "model", metavar="CHECKPOINT_OR_PRESET", help="preset name, HF folder, checkpoint or run folder"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--seed", type=int, default=0, help="initialisation seed of a preset, and the checks' seed"
    )
    parser.add_argument("--only", default=None, help="comma-separated check names to run (default: all)")
    parser.add_argument(
        "--runs", type=int, default=None, help="identical runs for the determinism line (default 100)"
    )
    parser.add_argument(
        "--calls", type=int, default=None, help="calls for the memory-leak line (default 100)"
    )
    parser.add_argument(
        "--long-length", type=int, default=None, help="long-prompt length (default 4x training, else 4096)"
    )
    parser.add_argument(
        "--memory-lengths",
        default=None,
        help="two stream lengths compared for memory growth (default 1024,8192)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (1 is faster on a shared CPU)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch
    from rich.console import Console
    from rich.table import Table

    from ssmkit.commands.eval import set_threads
    from ssmkit.evaluation.checklist import CHECKS, ChecklistConfig, run_checklist
    from ssmkit.evaluation.loading import load_model
    from ssmkit.models.config import atomic_write_text

    set_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    loaded = load_model(args.model, device=device, seed=args.seed)
    config = ChecklistConfig(seed=args.seed)
    if args.runs is not None:
        config.runs = args.runs
    if args.calls is not None:
        config.calls = args.calls
    if args.long_length is not None:
        config.long_length = args.long_length
    if args.memory_lengths is not None:
        try:
            short, long = (int(v) for v in args.memory_lengths.split(","))
        except ValueError:
            raise SystemExit(
                f"--memory-lengths must be two integers like 1024,8192, got {args.memory_lengths!r}"
            ) from None
        config.memory_lengths = (short, long)
    only = None if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    if only is not None:
        unknown = sorted(set(only) - set(CHECKS))
        if unknown:
            raise SystemExit(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")

    rebuild = None
    if loaded.kind == "preset":
        # A preset is built from a seed: the same-seed line also rebuilds it and compares weights.
        rebuild = lambda: load_model(args.model, device="cpu", seed=args.seed).model

    console = Console(width=max(Console().width, 120))

    def progress(result) -> None:
        console.print(f"{'[green]pass[/green]' if result.passed else '[red]FAIL[/red]'} {result.name}")

    results = run_checklist(
        loaded.model,
        config,
        train_seq_len=loaded.train_seq_len,
        rebuild=rebuild,
        only=only,
        callback=progress,
    )
    table = Table(title=f"ssmkit check {loaded.source} ({device})")
    for column in ("check", "result", "measured", "requirement"):
        table.add_column(column)
    for result in results:
        table.add_row(
            result.name,
            "[green]pass[/green]" if result.passed else "[bold red]FAIL[/bold red]",
            result.measured,
            result.requirement,
        )
    console.print(table)
    failed = [r.name for r in results if not r.passed]
    console.print(
        f"[red]{len(failed)} of {len(results)} checks failed: {', '.join(failed)}[/red]"
        if failed
        else f"[green]all {len(results)} checks passed[/green]"
    )
    if args.json:
        atomic_write_text(
            Path(args.json),
            json.dumps(
                {"model": loaded.source, "device": str(device), "checks": [r.to_dict() for r in results]},
                indent=2,
            ),
        )
    return 1 if failed else 0
