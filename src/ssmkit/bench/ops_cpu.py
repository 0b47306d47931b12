"""``ssmkit bench ops --device cpu``: our fast PyTorch paths against the sequential references and
the peers' PyTorch paths, per operator and size, timed in alternating rounds (median reported).

Targets (ratios within one run, fp32): SSD at least 2x faster than mamba_ssm's chunked PyTorch SSD
(``ssd_minimal_discrete``, what Hugging Face's CPU path computes); the Mamba-1 fast scan at least
10x faster than the sequential scan; S4's FFT form at least 10x faster than its recurrence at
l=8192. ``selective_scan_train`` times the scan's forward and backward at a training size (no
target; it is what a CPU training step of a small Mamba-1 spends most of its time in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ssmkit import ops
from ssmkit.bench import peers
from ssmkit.bench.report import Row
from ssmkit.bench.timing import alternate, time_once_cpu


@dataclass
class Case:
    """One operator at one size: implementations to time against each other.

    ``ours`` names the implementation the ratios are taken against; ``targets`` maps a baseline
    implementation to the minimum speed-up of ``ours`` over it.
    """

    op: str
    size: str
    tokens: int
    impls: dict[str, Callable[[], object]]
    ours: str
    targets: dict[str, float] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)  # impl -> reason it cannot run


def _ssd_case(
    batch: int, seqlen: int, with_reference: bool, nheads=24, headdim=64, dstate=128, chunk_size=256
) -> Case:
    x = torch.randn(batch, seqlen, nheads, headdim)
    dt = F.softplus(torch.randn(batch, seqlen, nheads) - 4)
    A = -torch.rand(nheads) - 0.5
    B, C = torch.randn(batch, seqlen, 1, dstate), torch.randn(batch, seqlen, 1, dstate)
    D = torch.randn(nheads)

    def run(backend: str) -> Callable[[], object]:
        return lambda: ops.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, backend=backend)

    impls = {"ssmkit torch": run("torch")}
    absent = {}
    if with_reference:
        impls["ssmkit reference (sequential)"] = run("reference")
    try:
        ssd_minimal = peers.mamba_ssd_minimal()

        def peer() -> object:
            # The peer's inputs are pre-discretized per head, as Hugging Face's torch path does.
            Bh, Ch = B.expand(-1, -1, nheads, -1), C.expand(-1, -1, nheads, -1)
            y, _ = ssd_minimal(x * dt[..., None], A * dt, Bh, Ch, chunk_size)
            return y + x * D[:, None]

        impls["mamba_ssm ssd_minimal (chunked torch)"] = peer
    except peers.PeerAbsent as exc:
        absent["mamba_ssm ssd_minimal (chunked torch)"] = f"peer absent ({exc})"
    size = f"b={batch} l={seqlen} h={nheads} p={headdim} n={dstate}"
    return Case(
        "ssd",
        size,
        batch * seqlen,
        impls,
        "ssmkit torch",
        {"mamba_ssm ssd_minimal (chunked torch)": 2.0},
        absent,
    )


def _scan_case(batch: int, seqlen: int, with_reference: bool, dim=1536, dstate=16) -> Case:
    u, delta = torch.randn(batch, dim, seqlen), torch.randn(batch, dim, seqlen) * 0.5
    A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
    B, C = torch.randn(batch, dstate, seqlen), torch.randn(batch, dstate, seqlen)
    D, delta_bias = torch.ones(dim), torch.full((dim,), -3.0)
    args = (u, delta, A, B, C, D, None, delta_bias, True)

    def run(backend: str) -> Callable[[], object]:
        return lambda: ops.selective_scan_fn(*args, backend=backend)

    impls = {"ssmkit torch": run("torch")}
    absent = {}
    targets = {}
    if with_reference:
        impls["ssmkit reference (sequential)"] = run("reference")
        targets["ssmkit reference (sequential)"] = 10.0
    try:
        scan_ref = peers.mamba_selective_scan_ref()
        impls["mamba_ssm selective_scan_ref (sequential)"] = lambda: scan_ref(*args)
        targets["mamba_ssm selective_scan_ref (sequential)"] = 10.0
    except peers.PeerAbsent as exc:
        absent["mamba_ssm selective_scan_ref (sequential)"] = f"peer absent ({exc})"
    size = f"b={batch} l={seqlen} d={dim} n={dstate}"
    return Case("selective_scan", size, batch * seqlen, impls, "ssmkit torch", targets, absent)


def _scan_train_case(batch: int, seqlen: int, dim=256, dstate=16) -> Case:
    """Forward and backward of the Mamba-1 scan at a training size (the default is the CPU task
    size: d_model 128, so d_inner 256, batch 32), gradients of every input as a layer needs them."""

    def leaf(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape) * scale + shift).requires_grad_()

    u, delta, z = leaf(batch, dim, seqlen), leaf(batch, dim, seqlen, scale=0.5), leaf(batch, dim, seqlen)
    A = (-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)).requires_grad_()
    B, C = leaf(batch, dstate, seqlen), leaf(batch, dstate, seqlen)
    D, delta_bias = leaf(dim, shift=1.0), leaf(dim, scale=0.1, shift=-3.0)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grad_out = torch.randn(batch, dim, seqlen)

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(False), torch.enable_grad():  # run() times under inference mode
                return torch.autograd.grad(forward(), inputs, grad_out)

        return run

    def ours(backend: str) -> Callable[[], object]:
        return step(lambda: ops.selective_scan_fn(*inputs, True, backend=backend))

    impls = {"ssmkit torch": ours("torch"), "ssmkit reference (sequential)": ours("reference")}
    absent = {}
    try:
        scan_ref = peers.mamba_selective_scan_ref()
        impls["mamba_ssm selective_scan_ref (sequential)"] = step(lambda: scan_ref(*inputs, True))
    except peers.PeerAbsent as exc:
        absent["mamba_ssm selective_scan_ref (sequential)"] = f"peer absent ({exc})"
    size = f"fwd+bwd b={batch} l={seqlen} d={dim} n={dstate}"
    return Case("selective_scan_train", size, batch * seqlen, impls, "ssmkit torch", {}, absent)


def _s4_case(batch: int, seqlen: int, channels=256, dstate=64) -> Case:
    from ssmkit.ops import s4

    u = torch.randn(batch, channels, seqlen)
    A, B, C, dt = s4.s4d_lin_system(channels, dstate)  # complex diagonal S4D-Lin
    D = torch.randn(channels)

    def fft() -> object:
        kernel = s4.s4d_kernel(A, B, C, dt, seqlen)
        return s4.fft_conv(u, kernel, D)

    def recurrent() -> object:
        return s4.s4d_recurrent(u, A, B, C, dt, D)

    impls = {"ssmkit FFT conv": fft, "ssmkit recurrence": recurrent}
    size = f"b={batch} l={seqlen} H={channels} N={dstate}"
    return Case("s4d", size, batch * seqlen, impls, "ssmkit FFT conv", {"ssmkit recurrence": 10.0})


def _step_case(batch: int, nheads=24, headdim=64, dstate=128) -> Case:
    state = torch.randn(batch, nheads, headdim, dstate)
    x, dt = torch.randn(batch, nheads, headdim), torch.rand(batch, nheads) * 0.1
    A = -torch.rand(nheads)
    B, C = torch.randn(batch, 1, dstate), torch.randn(batch, 1, dstate)
    D = torch.randn(nheads)

    def run(backend: str) -> Callable[[], object]:
        return lambda: ops.selective_state_update(state, x, dt, A, B, C, D=D, backend=backend)

    impls = {"ssmkit torch": run("torch"), "ssmkit reference": run("reference")}
    return Case(
        "selective_state_update", f"b={batch} h={nheads} p={headdim} n={dstate}", batch, impls, "ssmkit torch"
    )


def _conv_case(batch: int, seqlen: int, dim=3072, width=4) -> Case:
    x, weight, bias = torch.randn(batch, dim, seqlen), torch.randn(dim, width), torch.randn(dim)

    def run(backend: str) -> Callable[[], object]:
        return lambda: ops.causal_conv1d_fn(x, weight, bias, activation="silu", backend=backend)

    impls = {"ssmkit torch": run("torch"), "ssmkit reference": run("reference")}
    return Case(
        "causal_conv1d", f"b={batch} l={seqlen} d={dim} w={width}", batch * seqlen, impls, "ssmkit torch"
    )


def _norm_case(tokens: int, dim=3072, ngroups=8) -> Case:
    group_size = dim // ngroups
    x, z, weight = torch.randn(tokens, dim), torch.randn(tokens, dim), torch.randn(dim)

    def run(backend: str) -> Callable[[], object]:
        return lambda: ops.rms_norm_gated(
            x, weight, z, group_size=group_size, norm_before_gate=False, backend=backend
        )

    impls = {"ssmkit torch": run("torch"), "ssmkit reference": run("reference")}
    return Case(
        "rms_norm_gated", f"tokens={tokens} d={dim} group={group_size}", tokens, impls, "ssmkit torch"
    )


def cases(quick: bool = False) -> list[Case]:
    """The standard CPU sizes; ``quick`` keeps the small ones (seconds, for smoke tests)."""
    if quick:
        return [
            _ssd_case(1, 256, True, nheads=4, dstate=16, chunk_size=64),
            _scan_case(1, 256, True, dim=64),
            _scan_train_case(2, 32, dim=32),
            _s4_case(1, 1024, channels=16, dstate=16),
            _step_case(2, nheads=4, dstate=16),
            _conv_case(1, 256, dim=64),
            _norm_case(256, dim=256, ngroups=4),
        ]
    return [
        _ssd_case(1, 512, True),
        _ssd_case(1, 2048, True),
        _ssd_case(2, 2048, False),
        _ssd_case(1, 8192, False),
        _scan_case(1, 512, True),
        _scan_case(1, 2048, True),
        _scan_case(2, 2048, False),
        _scan_case(1, 8192, False),
        _scan_train_case(32, 64),
        _scan_train_case(8, 64, dstate=32),  # the README's CPU task: d_inner 256, d_state 32, batch 8
        _s4_case(1, 2048),
        _s4_case(1, 8192),
        _step_case(1),
        _step_case(16),
        _conv_case(1, 2048),
        _norm_case(2048),
    ]


def run(
    case_list: list[Case],
    rounds: int = 5,
    progress: bool = True,
    on_case: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Time every implementation of every case in alternating rounds; return table rows.

    on_case: called with all rows so far after each case (to save partial results as they come)."""
    from rich.progress import Progress

    rows: list[Row] = []
    with torch.inference_mode(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmarking", total=len(case_list))
        for case in case_list:
            bar.update(task, description=f"{case.op} {case.size}")
            timers = {name: (lambda fn=fn: time_once_cpu(fn)) for name, fn in case.impls.items()}
            timings = alternate(timers, rounds=rounds, warmup=lambda name, case=case: case.impls[name]())
            ours = timings[case.ours].median
            for name, timing in timings.items():
                row = Row(case.op, case.size, name, timing.median, timing.rounds, case.tokens)
                if name != case.ours:
                    row.ratio, row.ratio_to = timing.median / ours, "ours"
                    row.note = "ratio = its time / ours"
                    if name in case.targets:
                        row.target = f"ours >= {case.targets[name]:g}x faster"
                        row.met = row.ratio >= case.targets[name]
                rows.append(row)
            rows.extend(
                Row(case.op, case.size, name, None, note=reason) for name, reason in case.absent.items()
            )
            if on_case is not None:
                on_case(rows)
            bar.advance(task)
    return rows
