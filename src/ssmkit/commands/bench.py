"""``ssmkit bench ops --device cpu|cuda``: operator benchmarks against references and peers.
``ssmkit bench generate --device cuda``: prefill/decode throughput of whole models (bench/generate.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks against references and peer libraries")
    parser.add_argument("suite", choices=["ops", "generate"], help="what to benchmark")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run of seconds)")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated operators to run (e.g. ssd,selective_scan,ssd_first_call)",
    )
    parser.add_argument("--peers", default=None, help="folder holding peer libraries (prepare.sh DIR/site)")
    parser.add_argument("--json", default=None, help="write the results and environment to this file")
    parser.add_argument("--batches", default=None, help="generate: comma-separated batch sizes (1,16,64)")
    parser.add_argument("--prompts", default=None, help="generate: comma-separated prompt lengths")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.bench import peers
    from ssmkit.bench.report import print_table, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    peers.add_peer_path(args.peers)
    torch.manual_seed(0)
    if args.suite == "generate":
        return _run_generate(args)
    if args.device == "cpu":
        from ssmkit.bench import ops_cpu as suite
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        from ssmkit.bench import ops_cuda as suite
    cases = suite.cases(quick=args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.op in wanted]
    meta = {"suite": f"ops-{args.device}", "rounds": args.rounds}
    save = (lambda rows: write_json(args.json, rows, meta)) if args.json else None
    rows = suite.run(cases, rounds=args.rounds, on_case=save)
    if args.device == "cuda" and not args.quick and (not args.only or "ssd_first_call" in args.only):
        rows += suite.first_call_rows()
    print_table(
        rows,
        f"ssmkit bench ops --device {args.device} (median of {args.rounds} alternating rounds)",
        getattr(suite, "EXTRA_COLUMNS", ()),
    )
    if save is not None:
        save(rows)
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.bench import generate as suite
    from ssmkit.bench.report import print_table, write_json

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    meta = {"suite": f"generate-{args.device}", "rounds": args.rounds}
    save = (lambda rows: write_json(args.json, rows, meta)) if args.json else None

    def ints(text: str | None) -> tuple[int, ...] | None:
        return tuple(int(v) for v in text.split(",")) if text else None

    rows = suite.run(
        device=torch.device(args.device),
        quick=args.quick,
        rounds=args.rounds,
        batches=ints(args.batches),
        prompts=ints(args.prompts),
        on_case=save,
    )
    print_table(
        rows, f"ssmkit bench generate --device {args.device} (median of {args.rounds})", suite.EXTRA_COLUMNS
    )
    if save is not None:
        save(rows)
    return 0
