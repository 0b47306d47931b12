"""``ssmkit demo``: the toolkit's embedded default, needing no download.

- ``ssmkit demo``: train a small Mamba-1 (S6) model and the same stack with S4 (LTI) layers on the
  Mamba paper's selective copying task on the CPU (a few minutes, progress bars), then print both
  accuracies side by side and save the accuracy plot. It is ``ssmkit eval selective-copying`` with
  the CPU default config (:class:`ssmkit.evaluation.tasks.SelectiveCopyingConfig`); torch threads:
  every core (at most 4) on an idle machine, else one (``--threads`` sets them).
- ``ssmkit demo ops``: run every operator on a small embedded problem and print, per operator, the
  forward time of the fast path and of the sequential reference, the max error between them and
  tokens/s (seconds on a laptop CPU).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train Mamba-1 and S4 on selective copying on the CPU (minutes); 'demo ops': the operators",
        description="Without a subcommand: train a 2-layer Mamba-1 (S6) and the same stack with S4 (LTI) "
        "layers on selective copying (the CPU default of 'ssmkit eval selective-copying'), print both "
        "accuracies and save the plot. 'ssmkit demo ops': time every operator against its reference.",
    )
    parser.add_argument("--out", default="runs/demo", help="folder for results.json and accuracy.png")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per model (default: the CPU default's)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long pipeline check (does not learn the task)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads, or 'auto' (default): every core, at most 4, when the 1-minute load "
        "average is below 1, else 1 (extra threads on a busy CPU spin and slow training down)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.set_defaults(func=run_selective_copying_demo)
    what = parser.add_subparsers(dest="demo_what", metavar="{ops}")
    ops_parser = what.add_parser("ops", help="run each operator on a small problem: time, error, tokens/s")
    # SUPPRESS: "demo --device cuda ops" and "demo ops --device cuda" both work (default: cpu).
    ops_parser.add_argument("--device", default=argparse.SUPPRESS, help="cpu or cuda (default cpu)")
    ops_parser.add_argument("--seqlen", type=int, default=1024)
    ops_parser.set_defaults(func=run_ops)


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads for the demo: every core (at most 4) on an idle machine, one when other work is running.

    On the 2-core development machine two threads took a training step from 0.26 to 0.15 s when it was
    otherwise idle, while on the same machine loaded by other jobs two threads made a step 30 times
    slower than one (both threads spinning while they wait for a core). The 1-minute load average is
    the signal; where the OS has none (Windows), the machine is taken as idle."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, 4)) if load < 1.0 else 1


def parse_threads(value: str) -> int:
    """--threads: a positive integer, or 'auto' (:func:`auto_threads`)."""
    if value == "auto":
        return auto_threads()
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"--threads must be a positive integer or 'auto', got {value!r}") from None


def run_selective_copying_demo(args: argparse.Namespace) -> int:
    """Selective copying with the CPU default: progress bars, table, closing summary, plot."""
    from ssmkit.commands.eval import SMOKE_OVERRIDES, _console, run_synthetic_task, set_threads
    from ssmkit.evaluation.tasks import load_task_config

    threads = parse_threads(args.threads)
    set_threads(threads)
    task = "selective-copying"
    overrides = list(SMOKE_OVERRIDES[task]) if args.smoke else []
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    overrides.append(f"device={args.device}")
    config = load_task_config(task, None, overrides)
    console = _console()
    console.print(
        f"Selective copying (Mamba paper, section 4.1): {config.num_tokens} data tokens (vocabulary "
        f"{config.vocab_data}) scattered among noise in a context of {config.seqlen}, to be reproduced "
        f"in order after it. Training {' and '.join(config.models)} for {config.train.steps} steps each "
        f"(batch {config.train.batch_size}) on {config.device}, {threads} thread(s)."
    )
    results = run_synthetic_task(task, config, Path(args.out), progress=not args.no_progress)
    rows = results["rows"]
    summary = ", ".join(f"{row['label']} {100 * row['accuracy']:.1f}%" for row in rows)
    console.print(
        f"Accuracy on the copied tokens of held-out sequences: {summary} "
        f"(chance {100 / config.vocab_data:.2f}%; {sum(r['seconds'] for r in rows):.0f} s of training)."
    )
    console.print(f"plot: {results['plot']}  results: {results['json']}")
    return 0


def _problems(device, seqlen: int) -> list[tuple[str, str, int, Callable[[str], object]]]:
    """(operator, size, tokens, run(backend) -> output tensor) for every operator."""
    import torch
    import torch.nn.functional as F

    from ssmkit import ops
    from ssmkit.ops import s4

    def randn(*shape):
        return torch.randn(*shape, device=device)

    b, l = 2, seqlen
    problems = []

    h, p, n, g = 8, 64, 64, 2
    x, dt = randn(b, l, h, p), F.softplus(randn(b, l, h) - 3)
    A, Bm, Cm, D = -torch.rand(h, device=device) - 0.5, randn(b, l, g, n), randn(b, l, g, n), randn(h)
    problems.append(
        (
            "mamba_chunk_scan_combined",
            f"b={b} l={l} h={h} p={p} n={n} g={g}",
            b * l,
            lambda be: ops.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 128, D=D, backend=be),
        )
    )

    d, n1 = 256, 16
    u, delta = randn(b, d, l), randn(b, d, l)
    A1 = -torch.arange(1, n1 + 1, device=device, dtype=torch.float32).repeat(d, 1)
    B1, C1, z = randn(b, n1, l), randn(b, n1, l), randn(b, d, l)
    problems.append(
        (
            "selective_scan_fn",
            f"b={b} l={l} d={d} n={n1}",
            b * l,
            lambda be: ops.selective_scan_fn(
                u, delta, A1, B1, C1, torch.ones(d, device=device), z, delta_softplus=True, backend=be
            ),
        )
    )

    state = randn(64, h, p, n)
    xs, dts, Bs, Cs = (
        randn(64, h, p),
        torch.rand(64, h, device=device) * 0.1,
        randn(64, g, n),
        randn(64, g, n),
    )
    problems.append(
        (
            "selective_state_update",
            f"b=64 h={h} p={p} n={n}",
            64,
            lambda be: ops.selective_state_update(state.clone(), xs, dts, A, Bs, Cs, D=D, backend=be),
        )
    )

    xc, w, bias = randn(b, 512, l), randn(512, 4), randn(512)
    problems.append(
        (
            "causal_conv1d_fn",
            f"b={b} l={l} d=512 w=4",
            b * l,
            lambda be: ops.causal_conv1d_fn(xc, w, bias, activation="silu", backend=be),
        )
    )

    xn, zn, wn = randn(b * l, 512), randn(b * l, 512), randn(512)
    problems.append(
        (
            "rms_norm_gated",
            f"tokens={b * l} d=512 group=128",
            b * l,
            lambda be: ops.rms_norm_gated(xn, wn, zn, group_size=128, norm_before_gate=False, backend=be),
        )
    )

    us = randn(b, 64, l)
    As, Bs4, Cs4, dts4 = s4.s4d_lin_system(64, 32, device=device)
    problems.append(
        (
            "s4d (FFT vs recurrence)",
            f"b={b} l={l} H=64 N=32",
            b * l,
            lambda be: s4.s4d_forward(us, As, Bs4, Cs4, dts4, backend=be),
        )
    )
    return problems


def run_ops(args: argparse.Namespace) -> int:
    """``ssmkit demo ops``: the operator table."""
    import torch
    from rich.console import Console
    from rich.table import Table

    device = torch.device(args.device)
    torch.manual_seed(0)
    table = Table(title=f"ssmkit operators on {device} (fp32): fast path vs sequential reference")
    for column in (
        "operator",
        "size",
        "fast path",
        "reference",
        "speed-up",
        "max |error|",
        "tokens/s (fast)",
    ):
        table.add_column(column)

    def timed(fn: Callable[[], object]) -> tuple[object, float]:
        out = fn()  # warm-up: first-call allocations and lazy imports stay out of the timing
        times = []
        for _ in range(3):  # median of three: a single call on a busy machine can be far off
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return out, sorted(times)[1]

    with torch.inference_mode():
        for name, size, tokens, fn in _problems(device, args.seqlen):
            fast, t_fast = timed(lambda fn=fn: fn("auto"))
            ref, t_ref = timed(lambda fn=fn: fn("reference"))
            error = (fast - ref).abs().max().item()
            table.add_row(
                name,
                size,
                f"{t_fast * 1e3:.2f} ms",
                f"{t_ref * 1e3:.1f} ms",
                f"{t_ref / t_fast:.1f}x",
                f"{error:.1e}",
                f"{tokens / t_fast:,.0f}",
            )
    console = Console()
    Console(width=max(console.width, 150)).print(table)
    return 0
