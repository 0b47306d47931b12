"""GPU check of the Triton decode step, causal conv1d and gated RMSNorm: parity with the PyTorch path at
GPU-sized shapes, then timings against the peers (mamba_ssm, flash-linear-attention) and the
bandwidth floor.

    PYTHONPATH=src python scripts/gpu_check_small_ops.py [--peers peers/site] [--json out.json] [--sweep]

Timings are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), taken in
alternating rounds with the peer; forward+backward timings, which allocate inside autograd, are
eager medians (``triton.testing.do_bench``) for both sides. "GB/s" counts the bytes an ideal kernel
must move (each input read once, each output written once) and "% copy" compares that rate with a
device-to-device copy of 1 GiB measured in the same run.
"""

# ruff: noqa: B023 - every timing closure is built and run within one loop iteration (report()).
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from ssmkit.bench.peers import add_peer_path  # noqa: E402
from ssmkit.bench.timing import alternate, time_once_cuda_graph  # noqa: E402

ROWS: list[dict] = []


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def eager_median(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, rep=100, return_mode="median") / 1e3


def report(
    op: str,
    case: str,
    candidates: dict[str, Callable[[], float]],
    nbytes: float,
    copy_bw: float,
    rounds: int = 5,
) -> None:
    """Time the candidates in alternating rounds and print one row per candidate."""
    timings = alternate(candidates, rounds=rounds)
    for name, timing in timings.items():
        seconds = timing.median
        bandwidth = nbytes / seconds
        row = dict(
            op=op,
            case=case,
            impl=name,
            us=seconds * 1e6,
            gbps=bandwidth / 1e9,
            pct_copy=100 * bandwidth / copy_bw,
        )
        ROWS.append(row)
        rate = f"{row['gbps']:>8.0f} GB/s {row['pct_copy']:>6.1f} %"
        print(f"{op:<22} {case:<44} {name:<12} {row['us']:>10.2f} us {rate}")


def copy_bandwidth() -> float:
    # fp32 elements: torch's copy kernel moves them with full-width vector accesses.
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_once_cuda_graph(lambda: dst.copy_(src), rep_ms=200)
    return 2 * src.numel() * src.element_size() / seconds


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    err = rel_err(actual, expected)
    status = "ok" if err <= tol else "FAIL"
    print(f"  parity {name:<50} rel err {err:.2e} (tol {tol:.0e}) {status}")
    ROWS.append(dict(parity=name, rel_err=err, tol=tol, ok=err <= tol))


# --------------------------------------------------------------------------------------------- step
def step_inputs(
    batch: int,
    nheads: int = 80,
    headdim: int = 64,
    dstate: int = 128,
    ngroups: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    dev = "cuda"
    return dict(
        state=torch.randn(batch, nheads, headdim, dstate, device=dev),
        x=torch.randn(batch, nheads, headdim, device=dev, dtype=dtype),
        dt=torch.randn(batch, nheads, device=dev, dtype=dtype)[:, :, None].expand(batch, nheads, headdim),
        A=-torch.rand(nheads, device=dev)[:, None, None].expand(nheads, headdim, dstate),
        B=torch.randn(batch, ngroups, dstate, device=dev, dtype=dtype),
        C=torch.randn(batch, ngroups, dstate, device=dev, dtype=dtype),
        D=torch.randn(nheads, device=dev)[:, None].expand(nheads, headdim),
        z=torch.randn(batch, nheads, headdim, device=dev, dtype=dtype),
        dt_bias=torch.randn(nheads, device=dev)[:, None].expand(nheads, headdim),
    )


def step_bytes(t: dict) -> float:
    state = t["state"]
    small = sum(t[k].numel() * t[k].element_size() for k in ("x", "z", "B", "C")) * 1.0
    return 2 * state.numel() * state.element_size() + small + t["x"].numel() * t["x"].element_size()


def bench_step(copy_bw: float, sweep: bool) -> None:
    from ssmkit.ops import selective_state_update
    from ssmkit.ops.step.triton import selective_state_update_triton
    from ssmkit.ops.step.triton.state_update import state_update

    try:
        from ssmkit.bench.peers import mamba_selective_state_update

        peer = mamba_selective_state_update()
    except Exception as exc:  # noqa: BLE001 - any failure means the peer is absent
        print(f"  peer absent: mamba_ssm selective_state_update ({exc})")
        peer = None

    t = step_inputs(8, ngroups=8)
    expected_state = t["state"].clone()
    args = [t[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    expected = selective_state_update(expected_state, *args, dt_softplus=True, backend="torch")
    state = t["state"].clone()
    y = selective_state_update_triton(state, *args, True, None)
    check("step y (b=8, h=80, p=64, n=128, g=8, bf16)", y, expected, 2e-2)
    check("step state", state, expected_state, 1e-5)

    for batch in (1, 16, 128, 256):
        t = step_inputs(batch)
        args = [t[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
        ours_state, peer_state = t["state"].clone(), t["state"].clone()
        candidates = {
            "ssmkit": lambda: time_once_cuda_graph(
                lambda: selective_state_update_triton(ours_state, *args, True, None)
            )
        }
        if peer is not None:
            candidates["mamba_ssm"] = lambda: time_once_cuda_graph(
                lambda: peer(peer_state, *args, dt_softplus=True)
            )
        report("step", f"b={batch} h=80 p=64 n=128 bf16 x, fp32 state", candidates, step_bytes(t), copy_bw)

        if sweep and batch in (1, 128):
            out = torch.empty_like(t["x"])
            for block_p in (2, 4, 8, 16, 32):
                for warps in (1, 2, 4, 8):
                    if block_p * 128 // (32 * warps) < 1:
                        continue
                    fn = lambda bp=block_p, w=warps: state_update(
                        ours_state, *args[:5], args[5], args[6], args[7], True, None, out, config=(bp, w)
                    )
                    seconds = time_once_cuda_graph(fn)
                    print(
                        f"    sweep b={batch} BLOCK_P={block_p:<3} warps={warps}: {seconds * 1e6:8.2f} us "
                        f"{100 * step_bytes(t) / seconds / copy_bw:5.1f} % copy"
                    )


# ------------------------------------------------------------------------------------------- conv1d
def bench_conv1d(copy_bw: float) -> None:
    from ssmkit.ops import causal_conv1d_fn, causal_conv1d_update

    try:
        from fla.modules.causal_conv1d import causal_conv1d as fla_conv
        from fla.modules.causal_conv1d import causal_conv1d_update as fla_update
    except Exception as exc:  # noqa: BLE001
        print(f"  peer absent: fla causal_conv1d ({exc})")
        fla_conv = fla_update = None

    batch, dim, seqlen, width = 4, 5376, 2048, 4
    for layout in ("channel_last", "channel_first"):
        if layout == "channel_last":
            x_btd = torch.randn(batch, seqlen, dim, device="cuda", dtype=torch.bfloat16)
            x = x_btd.transpose(1, 2)
        else:
            x = torch.randn(batch, dim, seqlen, device="cuda", dtype=torch.bfloat16)
            x_btd = x.transpose(1, 2).contiguous()
        weight = torch.randn(dim, width, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
        xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        out = causal_conv1d_fn(xg, wg, bg, activation="silu", backend="triton")
        expected = causal_conv1d_fn(xt, wt, bt, activation="silu", backend="torch")
        check(f"conv1d fwd {layout}", out, expected, 2e-2)
        dout = torch.randn_like(out)
        out.backward(dout)
        expected.backward(dout)
        for name, a, e in (("dx", xg, xt), ("dweight", wg, wt), ("dbias", bg, bt)):
            check(f"conv1d bwd {name} {layout}", a.grad, e.grad, 4e-2)

        nbytes = 2 * x.numel() * x.element_size()
        candidates = {
            "ssmkit": lambda: time_once_cuda_graph(
                lambda: causal_conv1d_fn(x, weight, bias, activation="silu", backend="triton")
            )
        }
        if fla_conv is not None:
            candidates["fla"] = lambda: time_once_cuda_graph(
                lambda: fla_conv(x_btd, weight, bias, activation="silu")
            )
        report("conv1d fwd", f"b={batch} d={dim} l={seqlen} w=4 bf16 {layout}", candidates, nbytes, copy_bw)

        # Backward alone: x and dout read, dx written.
        dout = torch.randn_like(x)
        candidates = {
            "ssmkit": lambda: time_once_cuda_graph(
                lambda: torch.ops.ssmkit.causal_conv1d_bwd(x, weight, bias, None, None, dout, None, True)
            )
        }
        report(
            "conv1d bwd", f"b={batch} d={dim} l={seqlen} w=4 bf16 {layout}", candidates, 1.5 * nbytes, copy_bw
        )
        from ssmkit.ops.conv1d.triton.conv_bwd import _TUNED

        print(f"    conv1d bwd tile chosen by the autotuner: {_TUNED[layout == 'channel_last'].best_config}")

        # Forward + backward through autograd, eager, against the peer.
        def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            return lambda: fn().backward(dout_fb)

        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        dout_fb = torch.randn_like(x)
        candidates = {
            "ssmkit": lambda: eager_median(
                fwd_bwd(lambda: causal_conv1d_fn(xr, wr, br, activation="silu", backend="triton"))
            )
        }
        if fla_conv is not None:
            xf = x_btd.detach().clone().requires_grad_()
            dout_btd = dout_fb.transpose(1, 2).contiguous()
            candidates["fla"] = lambda: eager_median(
                lambda: fla_conv(xf, wr, br, activation="silu")[0].backward(dout_btd)
            )
        report(
            "conv1d fwd+bwd eager",
            f"b={batch} d={dim} l={seqlen} w=4 bf16 {layout}",
            candidates,
            2.5 * nbytes,
            copy_bw,
        )

    for batch in (1, 128):
        x = torch.randn(batch, dim, 1, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(dim, width, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
        conv_state = torch.randn(batch, dim, width - 1, device="cuda", dtype=torch.bfloat16)
        expected_state = conv_state.clone()
        expected = causal_conv1d_update(x, expected_state, weight, bias, "silu", backend="torch")
        got_state = conv_state.clone()
        got = causal_conv1d_update(x, got_state, weight, bias, "silu", backend="triton")
        check(f"conv1d update b={batch}", got, expected, 2e-2)
        check(f"conv1d update state b={batch}", got_state, expected_state, 1e-6)
        nbytes = 2 * (conv_state.numel() + x.numel()) * 2
        candidates = {
            "ssmkit": lambda: time_once_cuda_graph(
                lambda: causal_conv1d_update(x, conv_state, weight, bias, "silu", backend="triton")
            )
        }
        if fla_update is not None:
            cache = torch.randn(batch, dim, width, device="cuda", dtype=torch.bfloat16)
            x_fla = x.transpose(1, 2).contiguous()  # (batch, 1, dim)
            candidates["fla"] = lambda: time_once_cuda_graph(
                lambda: fla_update(x_fla, cache, weight=weight, bias=bias, activation="silu")
            )
        report("conv1d update", f"b={batch} d={dim} w=4 bf16", candidates, nbytes, copy_bw)


# --------------------------------------------------------------------------------------------- norm
def bench_norm(copy_bw: float) -> None:
    from ssmkit.ops import rms_norm_gated
    from ssmkit.ops.norm.triton import rms_norm_gated_triton

    try:
        from ssmkit.bench.peers import mamba_rmsnorm_gated

        peer = mamba_rmsnorm_gated()
    except Exception as exc:  # noqa: BLE001
        print(f"  peer absent: mamba_ssm rmsnorm_fn ({exc})")
        peer = None

    rows, dim = 16384, 5120
    for group_size, norm_before_gate in ((dim, False), (dim // 8, False), (dim, True)):
        x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, z)]
        truth = [t.detach().clone().requires_grad_() for t in (x, weight, z)]
        out = rms_norm_gated_triton(leaves[0], leaves[1], leaves[2], 1e-5, group_size, norm_before_gate)
        expected = rms_norm_gated(
            truth[0], truth[1], truth[2], 1e-5, group_size, norm_before_gate, backend="torch"
        )
        case = f"rows={rows} d={dim} g={group_size} nbg={norm_before_gate} bf16"
        check(f"norm fwd {case}", out, expected, 2e-2)
        dout = torch.randn_like(out)
        out.backward(dout)
        expected.backward(dout)
        for name, a, e in zip(("dx", "dweight", "dz"), leaves, truth):
            check(f"norm bwd {name} {case}", a.grad, e.grad, 4e-2)

        nbytes = 3 * x.numel() * x.element_size()
        candidates = {
            "ssmkit": lambda: time_once_cuda_graph(
                lambda: rms_norm_gated_triton(x, weight, z, 1e-5, group_size, norm_before_gate)
            )
        }
        if peer is not None:
            candidates["mamba_ssm"] = lambda: time_once_cuda_graph(
                lambda: peer(
                    x, weight, None, z=z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate
                )
            )
        report("norm fwd", case, candidates, nbytes, copy_bw)

        _, rstd = torch.ops.ssmkit.rms_norm_gated_fwd(x, weight, z, 1e-5, group_size, norm_before_gate)
        candidates = {
            "ssmkit": lambda: time_once_cuda_graph(
                lambda: torch.ops.ssmkit.rms_norm_gated_bwd(
                    dout, x, weight, z, rstd, group_size, norm_before_gate
                )
            )
        }
        report("norm bwd", case, candidates, 5 * x.numel() * x.element_size(), copy_bw)

        xr, wr, zr = (t.detach().clone().requires_grad_() for t in (x, weight, z))
        candidates = {
            "ssmkit": lambda: eager_median(
                lambda: rms_norm_gated_triton(xr, wr, zr, 1e-5, group_size, norm_before_gate).backward(dout)
            )
        }
        if peer is not None:
            candidates["mamba_ssm"] = lambda: eager_median(
                lambda: peer(
                    xr, wr, None, z=zr, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate
                ).backward(dout)
            )
        report("norm fwd+bwd eager", case, candidates, 8 * x.numel() * x.element_size(), copy_bw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=str(ROOT / "peers" / "site"), help="peers site folder")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="also sweep the decode-step tile configs")
    parser.add_argument("--only", choices=("step", "conv1d", "norm"), default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if Path(args.peers).is_dir():
        add_peer_path(args.peers)
    else:
        print(f"peer absent: no peers folder at {args.peers}")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", end="  ")
    import triton

    print(f"triton {triton.__version__}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (bytes read + written)")
    print(f"{'op':<22} {'case':<44} {'impl':<12} {'time':>13} {'rate':>13} {'% copy':>8}")
    if args.only in (None, "step"):
        bench_step(copy_bw, args.sweep)
    if args.only in (None, "conv1d"):
        bench_conv1d(copy_bw)
    if args.only in (None, "norm"):
        bench_norm(copy_bw)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gbps=copy_bw / 1e9, rows=ROWS), indent=1))
    failed = [row for row in ROWS if row.get("ok") is False]
    if failed:
        sys.exit(f"{len(failed)} parity checks failed")


if __name__ == "__main__":
    main()
