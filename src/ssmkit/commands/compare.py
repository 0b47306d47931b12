"""``ssmkit compare CHECKPOINT``: per-layer, per-stage diff of our model against a reference."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="diff our model against transformers (or a dump) stage by stage, layer by layer"
    )
    parser.add_argument("checkpoint", help="local Hugging Face checkpoint folder our model is loaded from")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--ids", help="comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", help="text, tokenized with the tokenizer files in the checkpoint folder")
    parser.add_argument(
        "--reference",
        default="transformers",
        help="'transformers' (default) or a dump file of reference stages (.json or .safetensors)",
    )
    parser.add_argument(
        "--reference-checkpoint",
        default=None,
        help="folder the transformers reference is loaded from (default: CHECKPOINT)",
    )
    parser.add_argument(
        "--tokens",
        action="store_true",
        help="run token by token through the inference cache (catches state-carrying bugs)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="relative difference above which a stage diverges (default per dtype; fp32 1e-4)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--per-token", action="store_true", help="also print the per-token max abs diffs")
    parser.add_argument(
        "--all", action="store_true", help="print every stage, not only up to the first divergence + 5"
    )
    parser.add_argument(
        "--json", default=None, help="write the full table (with per-token values) to this file"
    )
    parser.add_argument("--dump", default=None, help="write our stages to this .json/.safetensors file")
    parser.set_defaults(func=run)


def _input_ids(args: argparse.Namespace):
    import torch

    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError as err:
            raise SystemExit(f"--ids must be comma-separated integers, got {args.ids!r}") from err
        return torch.tensor([ids])
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise SystemExit(
            "--prompt needs the transformers package for the tokenizer; pass --ids instead"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    except Exception as err:
        raise SystemExit(
            f"no usable tokenizer files in {args.checkpoint} ({err}); pass --ids instead"
        ) from err
    return torch.tensor([tokenizer(args.prompt)["input_ids"]])


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch
    from rich.console import Console
    from rich.table import Table

    from ssmkit.evaluation.compare import (
        DEFAULT_TOLERANCE,
        compare_stages,
        load_dump,
        load_transformers_model,
        run_ours,
        run_transformers,
        save_dump,
    )
    from ssmkit.models import LanguageModel
    from ssmkit.models.config import atomic_write_text

    # Wide enough for the table when the output is a file or a pipe (rich assumes 80 columns there).
    console = Console(width=max(Console().width, 120))
    dtype = getattr(torch, args.dtype)
    input_ids = _input_ids(args)
    model = LanguageModel.from_pretrained(args.checkpoint, dtype=dtype).eval()
    ours = run_ours(model, input_ids, token_by_token=args.tokens)
    if args.dump:
        save_dump(ours, args.dump, input_ids=input_ids)
    if args.reference == "transformers":
        hf_model, model_type = load_transformers_model(
            args.reference_checkpoint or args.checkpoint, dtype=dtype
        )
        reference = run_transformers(hf_model, model_type, input_ids, token_by_token=args.tokens)
    else:
        reference, dump_ids = load_dump(args.reference)
        if dump_ids is not None and dump_ids.tolist() != input_ids.tolist():
            console.print(
                f"[yellow]warning: the dump was made for input ids {dump_ids.tolist()}, "
                f"not {input_ids.tolist()}[/yellow]"
            )
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[dtype]
    report = compare_stages(ours, reference, tolerance=tolerance, mode="tokens" if args.tokens else "full")

    first = report.first_divergence
    table = Table(title=f"ssmkit compare ({report.mode}, {args.dtype}, tolerance {tolerance:g} relative)")
    for column in ("layer", "stage", "shape", "max abs", "max rel", "sign mism. %", "worst tok", "status"):
        table.add_column(column, justify="right" if column not in ("stage", "status") else "left")
    shown = report.rows
    if first is not None and not args.all:
        stop = report.rows.index(first) + 6
        shown = report.rows[:stop]
    for row in shown:
        status = (
            "[bold red]FIRST DIVERGENCE[/bold red]"
            if row is first
            else ("[red]diverged[/red]" if row.diverged else "[green]ok[/green]")
        )
        table.add_row(
            "" if row.layer is None else str(row.layer),
            row.stage,
            "x".join(map(str, row.shape)),
            f"{row.max_abs:.3e}",
            f"{row.max_rel:.3e}",
            f"{row.sign_mismatch_pct:.2f}",
            str(row.worst_token),
            status,
        )
        if args.per_token:
            table.add_row(
                "", "  per token", "", " ".join(f"{v:.1e}" for v in row.per_token_max_abs), "", "", "", ""
            )
    console.print(table)
    if len(shown) < len(report.rows):
        console.print(f"({len(report.rows) - len(shown)} later stages not shown; --all shows them)")
    if report.only_ours or report.only_reference:
        console.print(
            f"stages only in ours: {report.only_ours or '-'}; only in the reference: "
            f"{report.only_reference or '-'}"
        )
    if first is None:
        console.print(f"[green]no stage diverges beyond {tolerance:g}[/green]")
    else:
        where = "model level" if first.layer is None else f"layer {first.layer}"
        console.print(
            f"[bold red]first divergence: {where}, stage {first.stage}, token {first.worst_token} "
            f"(max rel {first.max_rel:.3e})[/bold red]"
        )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report.to_dict(), indent=2))
    return 0 if first is None else 1
