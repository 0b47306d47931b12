"""Per-kernel CUDA times of the SSD forward and forward+backward, ours against mamba_ssm's.

    PYTHONPATH=src:peers/site python profile_ssd.py BATCH SEQLEN     (h=32, p=64, n=128, chunk 256, bf16)

Each implementation runs 3 warm-up calls, then 5 calls under torch.profiler; the table lists the
CUDA time per call of the 14 costliest kernels and the total.
"""

import sys
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from ssmkit import ops

sys.path.insert(0, "peers/site")
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as peer  # noqa: E402

CALLS = 5


def make_call(fn: Callable[[], object], backward: bool) -> Callable[[], None]:
    def call() -> None:
        y = fn()
        y = y[0] if isinstance(y, tuple) else y
        if backward:
            y.sum().backward()

    return call


def kernel_table(call: Callable[[], None]) -> list[tuple[float, float, str]]:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            call()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if micros > 0:
            rows.append((micros / CALLS, event.count / CALLS, event.key))
    return sorted(rows, reverse=True)


def main() -> None:
    batch, seqlen = int(sys.argv[1]), int(sys.argv[2])
    nheads, headdim, dstate, chunk = 32, 64, 128, 256
    dev, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=dtype).requires_grad_()
    dt = (torch.randn(batch, seqlen, nheads, device=dev) - 3).requires_grad_()
    A = (-torch.rand(nheads, device=dev) - 0.5).requires_grad_()
    B = torch.randn(batch, seqlen, 1, dstate, device=dev, dtype=dtype).requires_grad_()
    C = torch.randn(batch, seqlen, 1, dstate, device=dev, dtype=dtype).requires_grad_()
    D = torch.randn(nheads, device=dev).requires_grad_()
    dt_bias = torch.randn(nheads, device=dev).requires_grad_()
    impls = {
        "ours": lambda: ops.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, backend="triton"
        ),
        "mamba_ssm": lambda: peer(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True),
    }
    for backward in (False, True):
        for name, fn in impls.items():
            rows = kernel_table(make_call(fn, backward))
            mode = "fwd+bwd" if backward else "fwd"
            print(f"===== {name} {mode} (b={batch}, l={seqlen}); CUDA time per call, {CALLS} calls")
            for micros, count, key in rows[:14]:
                print(f"{micros:9.1f} us  x{count:4.1f}  {key[:110]}")
            print(f"{sum(r[0] for r in rows):9.1f} us  total")


if __name__ == "__main__":
    main()
