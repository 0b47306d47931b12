"""``ssmkit demo``: run every operator on a small embedded problem and print, per operator, the
forward time of the fast path and of the sequential reference, the max error between them and
tokens/s. Needs no download; takes seconds on a laptop CPU."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run each operator on a small problem: time, error, tokens/s")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
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
