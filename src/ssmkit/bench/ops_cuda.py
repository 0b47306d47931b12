"""``ssmkit bench ops --device cuda``: our Triton kernels against mamba_ssm's Triton kernels,
flash-linear-attention's ``chunk_simple_gla``, our own PyTorch path and PyTorch SDPA (flash
attention at the same heads), in one run.

How we measure (eager timings on these GPUs carry Python launch noise of up to 1.4x): forward
passes are timed inside CUDA graphs (``triton.testing.do_bench_cudagraph``, median), eager
forward and forward+backward with CUDA events; implementations alternate within every round and
the median of ``rounds`` (>= 5) rounds is reported. Achieved TFLOP/s and GB/s use the minimal
FLOPs and bytes of each problem (each input read once, each output written once).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ssmkit import ops
from ssmkit.bench import peers
from ssmkit.bench.report import Row
from ssmkit.bench.timing import alternate, time_once_cuda_eager, time_once_cuda_graph

EXTRA_COLUMNS = ("mode", "TFLOP/s", "GB/s", "% of copy BW")
DEVICE = torch.device("cuda")


@dataclass
class Impl:
    forward: Callable[[], object]
    forward_backward: Callable[[], object] | None = None
    graph: bool = True  # False for implementations that cannot be captured (host syncs)


@dataclass
class Case:
    op: str
    size: str
    tokens: int
    flops: float  # minimal forward FLOPs (0 when memory-bound and not meaningful)
    bytes: float  # minimal forward bytes moved
    impls: dict[str, Impl]
    ours: str = "ssmkit triton"
    absent: dict[str, str] = field(default_factory=dict)
    bwd_flops_factor: float = 2.5  # backward ~ 2.5x forward FLOPs for the fwd+bwd TFLOP/s figure


def _peer(case: Case, name: str, make: Callable[[], Impl]) -> None:
    try:
        case.impls[name] = make()
    except peers.PeerAbsent as exc:
        case.absent[name] = f"peer absent ({exc})"


def _backward_of(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    def run() -> object:
        for tensor in inputs:
            tensor.grad = None
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        return out

    return run


def ssd_case(
    batch: int, seqlen: int, nheads=32, headdim=64, dstate=128, ngroups=1, chunk=256, dtype=torch.bfloat16
) -> Case:
    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype).requires_grad_()

    x, B, C = (
        leaf(batch, seqlen, nheads, headdim),
        leaf(batch, seqlen, ngroups, dstate),
        leaf(batch, seqlen, ngroups, dstate),
    )
    dt = leaf(batch, seqlen, nheads, shift=-3.0).float().detach().requires_grad_()
    A = (-torch.rand(nheads, device=DEVICE) - 0.5).requires_grad_()
    D, dt_bias = (
        torch.ones(nheads, device=DEVICE, requires_grad=True),
        torch.zeros(nheads, device=DEVICE, requires_grad=True),
    )
    leaves = [x, dt, A, B, C, D, dt_bias]
    tokens = batch * seqlen
    flops = (
        2.0 * tokens * (chunk * dstate * ngroups + chunk * headdim * nheads + 2 * dstate * headdim * nheads)
    )
    nbytes = 2 * tokens * (2 * nheads * headdim + 2 * ngroups * dstate) + 4 * tokens * nheads

    def ours(backend: str) -> Impl:
        fwd = lambda: ops.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, backend=backend
        )
        return Impl(fwd, _backward_of(fwd, leaves))

    case = Case(
        "ssd",
        f"b={batch} l={seqlen} h={nheads} p={headdim} n={dstate} g={ngroups} chunk={chunk} bf16",
        tokens,
        flops,
        nbytes,
        {"ssmkit triton": ours("triton")},
    )

    def mamba() -> Impl:
        fn = peers.mamba_chunk_scan_combined()
        fwd = lambda: fn(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
        return Impl(fwd, _backward_of(fwd, leaves))

    def fla() -> Impl:
        fn = peers.fla_chunk_simple_gla()
        # SSD as scalar-gated linear attention: q = C, k = B, v = x * dt, log-decay g = dt * A (per head).
        q = C.detach().expand(-1, -1, nheads, -1).contiguous()
        k = B.detach().expand(-1, -1, nheads, -1).contiguous()
        dt_soft = F.softplus(dt.detach())
        v = (x.detach() * dt_soft[..., None]).to(dtype)
        g = (dt_soft * A.detach()).float()
        fwd = lambda: fn(q, k, v, g=g, scale=1.0)[0]
        return Impl(fwd, None)  # fla refuses its backward on Hopper with Triton 3.6 (wrong results)

    def sdpa() -> Impl:
        q = torch.randn(batch, nheads, seqlen, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
        k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return Impl(fwd, _backward_of(fwd, [q, k, v]))

    _peer(case, "mamba_ssm triton", mamba)
    _peer(case, "fla chunk_simple_gla", fla)
    case.impls["ssmkit torch"] = ours("torch")
    case.impls["torch SDPA (flash, causal)"] = sdpa()
    return case


def scan_case(batch: int, dim: int, seqlen: int, dstate=16, dtype=torch.bfloat16) -> Case:
    def leaf(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dt).requires_grad_()

    u, delta, z = (
        leaf(batch, dim, seqlen),
        leaf(batch, dim, seqlen, scale=0.5, shift=-2.0),
        leaf(batch, dim, seqlen),
    )
    B, C = leaf(batch, dstate, seqlen), leaf(batch, dstate, seqlen)
    A = (-torch.arange(1, dstate + 1, device=DEVICE, dtype=torch.float32).repeat(dim, 1)).requires_grad_()
    D, delta_bias = leaf(dim, dt=torch.float32), leaf(dim, dt=torch.float32)
    leaves = [u, delta, z, B, C, A, D, delta_bias]
    tokens = batch * seqlen
    nbytes = 2 * tokens * (4 * dim + 2 * dstate)  # u, delta, z in; y out; B, C in (bf16)
    flops = 0.0

    def ours(backend: str) -> Impl:
        fwd = lambda: ops.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, backend=backend)
        return Impl(fwd, _backward_of(fwd, leaves))

    case = Case(
        "selective_scan",
        f"b={batch} d={dim} l={seqlen} n={dstate} bf16",
        tokens,
        flops,
        nbytes,
        {"ssmkit triton": ours("triton")},
    )

    def mamba_cuda() -> Impl:
        fn = peers.mamba_selective_scan_cuda()
        fwd = lambda: fn(u, delta, A, B, C, D, z, delta_bias, True)
        return Impl(fwd, _backward_of(fwd, leaves))

    _peer(case, "mamba_ssm CUDA", mamba_cuda)
    if batch * dim * seqlen <= 2 * 1536 * 2048:
        # Not graph-capturable: it checks on the host whether a chunk's decay underflows.
        case.impls["ssmkit torch"] = ours("torch")
        case.impls["ssmkit torch"].graph = False
    return case


def decode_case(batch: int, nheads=80, headdim=64, dstate=128, ngroups=1, dtype=torch.bfloat16) -> Case:
    state = torch.randn(batch, nheads, headdim, dstate, device=DEVICE)  # fp32 state
    x = torch.randn(batch, nheads, headdim, device=DEVICE, dtype=dtype)
    dt = torch.randn(batch, nheads, device=DEVICE, dtype=dtype)[..., None].expand(-1, -1, headdim)
    A = (-torch.rand(nheads, device=DEVICE))[:, None, None].expand(-1, headdim, dstate)
    B, C = (torch.randn(batch, ngroups, dstate, device=DEVICE, dtype=dtype) for _ in range(2))
    D = torch.randn(nheads, device=DEVICE)[:, None].expand(-1, headdim)
    dt_bias = torch.randn(nheads, device=DEVICE)[:, None].expand(-1, headdim)
    z = torch.randn_like(x)
    args = (state, x, dt, A, B, C)
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    nbytes = 2 * state.numel() * 4 + 3 * x.numel() * 2 + 2 * B.numel() * 2 + batch * nheads * 2
    case = Case(
        "selective_state_update",
        f"b={batch} h={nheads} p={headdim} n={dstate} fp32 state",
        batch,
        0.0,
        nbytes,
        {"ssmkit triton": Impl(lambda: ops.selective_state_update(*args, **kwargs, backend="triton"))},
    )

    def mamba() -> Impl:
        fn = peers.mamba_selective_state_update()
        return Impl(lambda: fn(*args, **kwargs))

    _peer(case, "mamba_ssm triton", mamba)
    case.impls["ssmkit torch"] = Impl(lambda: ops.selective_state_update(*args, **kwargs, backend="torch"))
    return case


def conv_case(batch: int, dim: int, seqlen: int, width=4, dtype=torch.bfloat16) -> Case:
    x = torch.randn(batch, dim, seqlen, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(dim, width, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(dim, device=DEVICE, dtype=dtype, requires_grad=True)
    nbytes = 2 * 2 * x.numel()

    def ours(backend: str) -> Impl:
        fwd = lambda: ops.causal_conv1d_fn(x, weight, bias, activation="silu", backend=backend)
        return Impl(fwd, _backward_of(fwd, [x, weight, bias]))

    return Case(
        "causal_conv1d",
        f"b={batch} d={dim} l={seqlen} w={width} bf16",
        batch * seqlen,
        0.0,
        nbytes,
        {"ssmkit triton": ours("triton"), "ssmkit torch": ours("torch")},
    )


def norm_case(tokens: int, dim: int, group: int, dtype=torch.bfloat16) -> Case:
    x = torch.randn(tokens, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    z = torch.randn(tokens, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(dim, device=DEVICE, dtype=dtype, requires_grad=True)
    nbytes = 3 * 2 * x.numel()

    def ours(backend: str) -> Impl:
        fwd = lambda: ops.rms_norm_gated(
            x, weight, z, group_size=group, norm_before_gate=False, backend=backend
        )
        return Impl(fwd, _backward_of(fwd, [x, z, weight]))

    case = Case(
        "rms_norm_gated",
        f"tokens={tokens} d={dim} group={group} bf16",
        tokens,
        0.0,
        nbytes,
        {"ssmkit triton": ours("triton"), "ssmkit torch": ours("torch")},
    )

    def mamba() -> Impl:
        fn = peers.mamba_rmsnorm_gated()
        fwd = lambda: fn(x, weight, None, z=z, group_size=group, norm_before_gate=False)
        return Impl(fwd, _backward_of(fwd, [x, z, weight]))

    _peer(case, "mamba_ssm triton", mamba)
    return case


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [
            ssd_case(2, 1024, nheads=8),
            scan_case(1, 512, 1024),
            decode_case(4, nheads=8),
            conv_case(2, 512, 1024),
            norm_case(2048, 1024, 256),
        ]
    # Most telling sizes first: a run cut short by a time limit keeps the rows that matter most.
    return [
        ssd_case(16, 2048),
        decode_case(1),
        decode_case(128),
        scan_case(2, 1536, 2048),
        conv_case(4, 4096, 2048),
        norm_case(16384, 4096, 512),
        ssd_case(4, 8192),
        ssd_case(1, 32768),
        scan_case(8, 5120, 2048),
        scan_case(2, 1536, 8192),
        decode_case(16),
        decode_case(512),
    ]


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + written), the ceiling
    memory-bound kernels are judged against."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    seconds = time_once_cuda_graph(lambda: dst.copy_(src), rep_ms=100)
    return 2 * src.numel() / seconds


def _capturable(forward: Callable[[], object]) -> bool:
    """Whether ``forward`` can be captured in a CUDA graph (a host sync inside it cannot)."""
    try:
        time_once_cuda_graph(forward, rep_ms=1)
        return True
    except Exception:  # noqa: BLE001 - any capture failure means: time it eagerly only
        torch.cuda.synchronize()
        return False


def _modes(impl: Impl) -> dict[str, Callable[[], float]]:
    modes = {"eager fwd": lambda: time_once_cuda_eager(impl.forward, DEVICE)}
    if impl.graph:
        modes["graph fwd"] = lambda: time_once_cuda_graph(impl.forward)
    if impl.forward_backward is not None:
        modes["eager fwd+bwd"] = lambda: time_once_cuda_eager(impl.forward_backward, DEVICE, repeats=5)
    return modes


def run(
    case_list: list[Case],
    rounds: int = 5,
    progress: bool = True,
    on_case: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Time every implementation of every case; ``on_case`` gets all rows so far after each case
    (a run cut short by a time limit still leaves its finished cases behind)."""
    import time

    from rich.progress import Progress

    bandwidth = copy_bandwidth()
    rows: list[Row] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmarking", total=len(case_list))
        for case in case_list:
            bar.update(task, description=f"{case.op} {case.size}")
            case_start = time.perf_counter()
            timers: dict[str, Callable[[], float]] = {}
            failed: dict[str, str] = {}
            for name, impl in case.impls.items():
                # Warm-up: compile, autotune, allocate; an implementation that fails is reported, not fatal.
                try:
                    impl.forward()
                    if impl.forward_backward is not None:
                        impl.forward_backward()
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - recorded in the table
                    failed[name] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                    continue
                if impl.graph and not _capturable(impl.forward):
                    impl.graph = False
                    failed[f"{name} (graph)"] = "not capturable in a CUDA graph (synchronises with the host)"
                for mode, timer in _modes(impl).items():
                    timers[f"{name}|{mode}"] = timer
            timings = alternate(timers, rounds=rounds)
            for key, timing in timings.items():
                name, mode = key.split("|")
                seconds = timing.median
                row = Row(case.op, case.size, name, seconds, timing.rounds, case.tokens)
                flops = case.flops * (1 + case.bwd_flops_factor if "bwd" in mode else 1)
                row.extra = {"mode": mode}
                if flops:
                    row.extra["TFLOP/s"] = f"{flops / seconds / 1e12:.1f}"
                if case.bytes and "bwd" not in mode:
                    row.extra["GB/s"] = f"{case.bytes / seconds / 1e9:.0f}"
                    row.extra["% of copy BW"] = f"{100 * case.bytes / seconds / bandwidth:.0f}%"
                ours_key = f"{case.ours}|{mode}"
                if name != case.ours and ours_key in timings:
                    row.ratio, row.ratio_to = seconds / timings[ours_key].median, "ours"
                rows.append(row)
            rows.extend(
                Row(case.op, case.size, name, None, note=why)
                for name, why in {**case.absent, **failed}.items()
            )
            print(
                f"{case.op} {case.size}: {time.perf_counter() - case_start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            if on_case is not None:
                on_case(rows)
            bar.advance(task)
    rows.append(
        Row(
            "copy",
            "512 MiB device-to-device",
            "torch copy_",
            2 * 512 * 2**20 / bandwidth,
            note=f"{bandwidth / 1e12:.2f} TB/s (read + write)",
        )
    )
    return rows


FIRST_CALL_SCRIPT = textwrap.dedent("""
    import sys, time
    t0 = time.perf_counter()
    import torch
    which = sys.argv[1]
    b, l, h, p, n = 4, 8192, 32, 64, 128
    dev = "cuda"
    x = torch.randn(b, l, h, p, device=dev, dtype=torch.bfloat16)
    dt = torch.randn(b, l, h, device=dev) - 3
    A = -torch.rand(h, device=dev) - 0.5
    B = torch.randn(b, l, 1, n, device=dev, dtype=torch.bfloat16)
    C = torch.randn_like(B)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    if which == "ssmkit":
        from ssmkit.ops import mamba_chunk_scan_combined as f
    else:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as f
    f(x, dt, A, B, C, 256, dt_softplus=True)
    torch.cuda.synchronize()
    print(time.perf_counter() - t1)
""")


def first_call_latency(which: str) -> tuple[float | None, str]:
    """Seconds from import to the end of the first SSD call at (4, 8192) in a fresh process with an
    empty Triton cache (a user's first call after install), and a note."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        proc = subprocess.run(
            [sys.executable, "-c", FIRST_CALL_SCRIPT, which],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    if proc.returncode != 0:
        return None, "failed: " + proc.stderr.strip().splitlines()[-1][
            :200
        ] if proc.stderr.strip() else "failed"
    return float(proc.stdout.strip().splitlines()[-1]), "fresh process, empty Triton cache"


def first_call_rows() -> list[Row]:
    rows = []
    for which, name in (("ssmkit", "ssmkit triton"), ("mamba_ssm", "mamba_ssm triton")):
        seconds, note = first_call_latency(which)
        rows.append(
            Row(
                "ssd first call",
                "b=4 l=8192 h=32 p=64 n=128 bf16",
                name,
                seconds,
                note=note,
                target="<= 5 s" if which == "ssmkit" else None,
                met=(seconds is not None and seconds <= 5) if which == "ssmkit" else None,
            )
        )
    return rows
