"""GPU check of the Triton SSD kernels: first-call time, parity with the PyTorch path at GPU-sized
shapes (bf16 and fp32, forward and every gradient), then timings against mamba_ssm's Triton SSD.

    PYTHONPATH=src python scripts/gpu_check_ssd.py [--peers peers/site] [--json out.json] [--rounds 5]

Forward timings are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``);
forward+backward timings, which allocate inside autograd, are eager medians
(``triton.testing.do_bench``) for both sides. Candidates are timed in alternating rounds.
The benchmark shapes are the issue's: h=32, p=64, n=128, g=1, chunk 256, bf16, with D, dt_bias and
softplus as the Mamba-2 layer calls it, at (batch, seqlen) = (16, 2048), (4, 8192), (1, 32768).
"""

# ruff: noqa: B023 - every timing closure is built and run within one loop iteration.
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from ssmkit.bench.peers import PeerAbsent, add_peer_path, mamba_chunk_scan_combined  # noqa: E402
from ssmkit.bench.timing import alternate, time_once_cuda_graph  # noqa: E402

ROWS: list[dict] = []
BENCH_SHAPES = [(16, 2048), (4, 8192), (1, 32768)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def inputs(
    batch,
    seqlen,
    nheads=32,
    headdim=64,
    ngroups=1,
    dstate=128,
    dtype=torch.bfloat16,
    z=False,
    init=False,
    grad=False,
):
    dev = "cuda"
    t = dict(
        x=torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=dtype),
        dt=torch.randn(batch, seqlen, nheads, device=dev, dtype=dtype) * 0.5 - 1.0,
        A=-torch.rand(nheads, device=dev) * 4 - 0.5,
        B=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
        C=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
        D=torch.randn(nheads, device=dev),
        z=torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=dtype) if z else None,
        dt_bias=torch.randn(nheads, device=dev) * 0.3,
        initial_states=torch.randn(batch, nheads, headdim, dstate, device=dev) if init else None,
    )
    if grad:
        t = {k: None if v is None else v.requires_grad_() for k, v in t.items()}
    return t


def call(fn: Callable, t: dict, chunk: int, final: bool = False):
    return fn(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        chunk,
        t["D"],
        t["z"],
        t["dt_bias"],
        t["initial_states"],
        None,
        None,
        True,
        (0.0, float("inf")),
        final,
        False,
    )


def ours() -> Callable:
    from ssmkit.ops.ssd.triton import ssd_triton

    return ssd_triton


def first_call() -> None:
    """A cold first call at (4, 8192) (compilation included): forward, then backward. Triton's own
    one-time set-up (driver, launcher build) is measured first, on a trivial kernel, so that what
    our kernels cost shows apart."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    print("== first call (cold Triton cache), (4, 8192) bf16 ==")
    src = torch.randn(1000, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    _copy[(4,)](src, torch.empty_like(src), 1000, BLOCK=256)
    torch.cuda.synchronize()
    setup = time.perf_counter() - start
    print(f"triton set-up + one trivial kernel {setup:.2f} s")
    t = inputs(4, 8192, grad=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = call(ours(), t, 256)[0]
    torch.cuda.synchronize()
    fwd = time.perf_counter() - start
    start = time.perf_counter()
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    bwd = time.perf_counter() - start
    start = time.perf_counter()
    call(ours(), t, 256)[0].float().square().mean().backward()
    torch.cuda.synchronize()
    again = time.perf_counter() - start
    print(f"first forward {fwd:.2f} s, first backward {bwd:.2f} s, second forward+backward {again:.3f} s")
    ROWS.append(dict(check="first_call", triton_setup_s=setup, forward_s=fwd, backward_s=bwd))


def breakdown() -> None:
    """Per-kernel CUDA time of one forward+backward (torch.profiler), to show where time goes."""
    from torch.profiler import ProfilerActivity, profile

    for batch, seqlen in ((16, 2048), (1, 32768)):
        t = inputs(batch, seqlen, grad=True)
        grad_out = torch.randn_like(t["x"])
        for _ in range(2):
            call(ours(), t, 256)[0].backward(grad_out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                call(ours(), t, 256)[0].backward(grad_out)
            torch.cuda.synchronize()
        print(f"== per-kernel CUDA time, (b, l) = {(batch, seqlen)}, 3 forward+backward ==")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=48))


def fwd_breakdown() -> None:
    """Per-kernel CUDA time of the forward alone, ours and mamba_ssm's, at (16, 2048): which stage
    makes the difference."""
    from torch.profiler import ProfilerActivity, profile

    t = inputs(16, 2048)
    candidates = {"ssmkit": ours()}
    try:
        peer = mamba_chunk_scan_combined()
        candidates["mamba_ssm"] = lambda x, dt, A, B, C, chunk, D, z, dt_bias, *rest: peer(
            x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True
        )
    except PeerAbsent as exc:
        print(f"peer absent: {exc}")
    for name, fn in candidates.items():
        with torch.no_grad():
            for _ in range(3):
                call(fn, t, 256)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    call(fn, t, 256)
                torch.cuda.synchronize()
        print(f"== {name}: per-kernel CUDA time of 5 forwards, (16, 2048) ==")
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=48)
        print(table)
        ROWS.append(dict(check="fwd_breakdown", impl=name, table=table))


# Tile variants per forward stage (fields of ssmkit.ops.ssd.triton.config.Tiles); the first of
# each list is the current default on Hopper.
SWEEP = {
    "chunk_scan": [
        {},
        dict(block_m=128),
        dict(block_m=128, num_stages=2),
        dict(block_m=32),
        dict(block_k=16),
        dict(num_stages=2),
        dict(num_stages=4),
        dict(num_warps=8),
        dict(block_state=128),
        dict(block_m=128, block_state=128),
    ],
    "chunk_state": [
        {},
        dict(block_state=128),
        dict(block_k=32, num_stages=4),
        dict(num_warps=8),
        dict(block_state=128, num_warps=8),
        dict(num_stages=2),
    ],
    "bmm": [{}, dict(block_m=128, num_warps=8), dict(block_k=32), dict(num_stages=2)],
}


def sweep(rounds: int) -> None:
    """Forward time (CUDA graph, median of ``rounds``) at (16, 2048) for tile variants of each
    forward stage, one stage at a time, the others at their defaults."""
    from ssmkit.ops.ssd.triton import config

    t = inputs(16, 2048)
    fn = ours()
    for stage, variants in SWEEP.items():
        for variant in variants:
            try:
                with config.forced(stage, **variant), torch.no_grad():
                    start = time.perf_counter()
                    call(fn, t, 256)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    runs = sorted(time_once_cuda_graph(lambda: call(fn, t, 256)) for _ in range(rounds))
                ms = runs[len(runs) // 2] * 1e3
                print(f"sweep {stage} {variant or 'default'}: fwd {ms:.3f} ms (first call {first:.1f} s)")
                ROWS.append(dict(check="sweep", stage=stage, variant=variant, fwd_ms=ms, first_s=first))
            except Exception as exc:  # a variant that does not compile is a result too
                print(f"sweep {stage} {variant}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                ROWS.append(dict(check="sweep", stage=stage, variant=variant, error=str(exc)[:400]))


def parity() -> None:
    """Ours against the PyTorch path (fp32 compute) on the same inputs: outputs and gradients."""
    from ssmkit.ops.ssd.chunked import ssd_chunked

    print("== parity with the PyTorch path ==")
    for dtype, shape in (
        (torch.float32, (2, 1000, 8, 64, 2, 64, 128)),
        (torch.bfloat16, (2, 2050, 8, 64, 1, 128, 256)),
        (torch.float16, (1, 777, 6, 48, 3, 32, 64)),
    ):
        batch, seqlen, nheads, headdim, ngroups, dstate, chunk = shape
        t = inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype, z=True, init=True, grad=True)
        results = {}
        for name, fn in (("triton", ours()), ("torch", ssd_chunked)):
            for v in t.values():
                if v is not None:
                    v.grad = None
            out, final, _ = call(fn, t, chunk, final=True)
            torch.manual_seed(1)
            g_out, g_final = torch.randn_like(out), torch.randn_like(final)
            ((out.float() * g_out.float()).sum() + (final.float() * g_final.float()).sum()).backward()
            results[name] = [out.detach(), final.detach()] + [
                v.grad.detach().clone() for v in t.values() if v is not None
            ]
        names = ["out", "final"] + ["d" + k for k, v in t.items() if v is not None]
        errs = {n: rel_err(a, b) for n, a, b in zip(names, results["triton"], results["torch"])}
        worst = max(errs.values())
        print(
            f"{str(dtype):15s} {shape}: worst rel err {worst:.2e}  "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        )
        ROWS.append(dict(check="parity", dtype=str(dtype), shape=shape, errors=errs))


def timings(rounds: int) -> None:
    try:
        peer = mamba_chunk_scan_combined()
    except PeerAbsent as exc:
        peer = None
        print(f"peer absent ({exc})")
    import triton.testing

    print("== timings, h=32 p=64 n=128 g=1 chunk 256 bf16 (ms, median) ==")
    header = ("(b, l)", "pass", "ssmkit", "mamba_ssm", "speedup", "max|diff|/rms")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(header, (12, 8, 9, 10, 8, 14))))
    for batch, seqlen in BENCH_SHAPES:
        t = inputs(batch, seqlen)
        fns = {"ssmkit": lambda: call(ours(), t, 256)[0]}
        if peer is not None:
            fns["mamba_ssm"] = lambda: peer(
                t["x"], t["dt"], t["A"], t["B"], t["C"], 256, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True
            )
        outs = {k: f() for k, f in fns.items()}
        agree = float("nan")
        if "mamba_ssm" in outs:
            ref = outs["mamba_ssm"].float()
            agree = ((outs["ssmkit"].float() - ref).abs().max() / ref.square().mean().sqrt()).item()
        fwd = alternate({k: (lambda f=f: time_once_cuda_graph(f)) for k, f in fns.items()}, rounds=rounds)

        tg = inputs(batch, seqlen, grad=True)
        grad_out = torch.randn_like(tg["x"])
        leaves = [v for v in tg.values() if v is not None]

        def ours_fb():
            call(ours(), tg, 256)[0].backward(grad_out)

        def peer_fb():
            peer(
                tg["x"],
                tg["dt"],
                tg["A"],
                tg["B"],
                tg["C"],
                256,
                D=tg["D"],
                dt_bias=tg["dt_bias"],
                dt_softplus=True,
            ).backward(grad_out)

        fb_fns = {"ssmkit": ours_fb}
        if peer is not None:
            fb_fns["mamba_ssm"] = peer_fb
        fb = alternate(
            {
                k: (
                    lambda f=f: (
                        triton.testing.do_bench(f, rep=100, grad_to_none=leaves, return_mode="median") / 1e3
                    )
                )
                for k, f in fb_fns.items()
            },
            rounds=rounds,
        )
        for label, res in (("fwd", fwd), ("fwd+bwd", fb)):
            mine = res["ssmkit"].median * 1e3
            theirs = res["mamba_ssm"].median * 1e3 if "mamba_ssm" in res else float("nan")
            print(
                f"{str((batch, seqlen)):>12s} {label:>8s} {mine:9.3f} {theirs:10.3f} {theirs / mine:7.2f}x"
                f" {agree if label == 'fwd' else float('nan'):14.2e}"
            )
            ROWS.append(
                dict(check="timing", shape=(batch, seqlen), pass_=label, ssmkit_ms=mine, mamba_ssm_ms=theirs)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=str(ROOT / "peers" / "site"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    choices = ["first", "parity", "timings", "breakdown", "fwd_breakdown", "sweep"]
    parser.add_argument("--skip", nargs="*", default=[], choices=choices)
    parser.add_argument("--only", nargs="*", default=None, choices=choices, help="run just these steps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    add_peer_path(args.peers)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, end=" ")
    import triton

    print("triton", triton.__version__)
    steps = (
        ("first", first_call),
        ("parity", parity),
        ("timings", lambda: timings(args.rounds)),
        ("breakdown", breakdown),
        ("fwd_breakdown", fwd_breakdown),
        ("sweep", lambda: sweep(args.rounds)),
    )
    for name, step in steps:
        if name in args.skip or (args.only is not None and name not in args.only):
            continue
        try:
            step()
        except Exception:  # report and go on: one failing check must not hide the others
            traceback.print_exc()
            ROWS.append(dict(check=name, error=traceback.format_exc()))
        if args.json:  # after every step: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(ROWS, indent=1, default=str))


if __name__ == "__main__":
    main()
