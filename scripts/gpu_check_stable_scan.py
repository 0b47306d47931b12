"""GPU check of the stable state scan (issue 8): the Triton kernels against the PyTorch loop at
GroundedMamba-minimal's Tiny Shakespeare training shape (b=64 l=256 d_inner=1024 d_state=16 fp32),
output and gradient parity then forward and forward+backward times, and the SSD kernel at a Mamba-2
layer of the same width for scale.

    PYTHONPATH=src python scripts/gpu_check_stable_scan.py
"""

import torch
import triton.testing as tt

from ssmkit import ops
from ssmkit.ops.stable_scan import stable_scan

torch.manual_seed(0)
dev = "cuda"
b, l, d, n = 64, 256, 1024, 16
x = torch.randn(b, l, d, device=dev)
dt = 0.001 + 0.099 * torch.rand(b, l, d, device=dev)
A = -3.0 * torch.eye(n, device=dev) + torch.randn(n, n, device=dev) / n**0.5
B = torch.randn(b, l, n, device=dev)
C = torch.randn(b, l, n, device=dev)
w = 1 + 0.1 * torch.randn(n, device=dev)
bias = 0.1 * torch.randn(n, device=dev)
leaves = [t.requires_grad_() for t in (x, dt, A, B, C, w, bias)]


def run(backend):
    return stable_scan(*leaves, eps=1e-5, backend=backend)


def fwd_bwd(backend):
    y, h = run(backend)
    grads = torch.autograd.grad((y.square().sum() + h.sum()), leaves)
    return y, h, grads


yt, ht, gt = fwd_bwd("triton")
yr, hr, gr = fwd_bwd("torch")


def rel(a, r):
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


print("parity y", rel(yt, yr), "h", rel(ht, hr), "grads", [f"{rel(a, r):.1e}" for a, r in zip(gt, gr)])
for backend in ("triton", "torch"):
    with torch.no_grad():
        f = tt.do_bench(lambda backend=backend: run(backend), rep=200)
    fb = tt.do_bench(lambda backend=backend: fwd_bwd(backend), rep=300)
    print(f"stable_scan {backend:7s} b={b} l={l} d={d} n={n} fp32: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms")

h, p = d // 64, 64
xs = torch.randn(b, l, h, p, device=dev, dtype=torch.bfloat16, requires_grad=True)
dts = torch.rand(b, l, h, device=dev, requires_grad=True)
As = -torch.rand(h, device=dev)
Bs = torch.randn(b, l, 1, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
Cs = torch.randn(b, l, 1, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
ssd = lambda: ops.mamba_chunk_scan_combined(xs, dts, As, Bs, Cs, 128)
with torch.no_grad():
    f = tt.do_bench(ssd, rep=200)
fb = tt.do_bench(lambda: ssd().float().square().sum().backward(), rep=300)
print(f"SSD (Mamba-2) b={b} l={l} h={h} p={p} n=64 bf16: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms")
