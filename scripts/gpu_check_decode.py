"""GPU check of the fused decode step (issue 5): parity, kernels per layer, batch-1 step time.

    PYTHONPATH=src python scripts/gpu_check_decode.py [--json out.json] [--presets mamba2-130m ...]
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/gpu_check_decode.py --count-only \
        --presets tiny-mamba2 tiny-mamba1                                   # on a CPU

For each preset (random weights, every parameter moved off its init) and dtype (bf16, fp32):

- parity: ``decode_step`` (what ``DecodeRunner`` runs and captures: Triton kernels, A = -exp(A_log)
  inside the step kernel, each residual add fused with the next norm), replayed from a CUDA graph,
  against the unfused PyTorch ops (``model(...)`` under ``ssmkit.ops.backend("torch")``, eager) and
  against one full forward pass over the same tokens; logits of every step and the final states.
- ops per layer: the operators one decode step dispatches (views and allocations left out; a Triton
  kernel is one custom op), counted with a TorchDispatchMode on models of 2 and 3 layers: the
  difference is what one more layer costs. Both for ``decode_step`` and ``model(...)``.
- timing: one batch-1 decode step captured in a CUDA graph, median of replays, for ``decode_step``
  and for ``model(...)``; against the weight-read floor (parameter bytes / device copy bandwidth).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from ssmkit import ops  # noqa: E402
from ssmkit.inference import DecodeRunner, prefill  # noqa: E402
from ssmkit.inference.decode import decode_step  # noqa: E402
from ssmkit.models import LanguageModel, get_preset  # noqa: E402

ROWS: list[dict] = []
PROMPT = 32
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def random_model(preset: str, dtype: torch.dtype, device: torch.device, n_layer: int | None = None):
    config = get_preset(preset)
    if n_layer is not None:
        config.layer_types = [config.layer_types[0]] * n_layer
        config.n_layer = n_layer
    torch.manual_seed(0)
    model = LanguageModel(config).to(device=device, dtype=dtype).eval()
    # Norm weights of 1, D = 1, zero biases would hide mix-ups: move every parameter off its init.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator).to(device=device, dtype=dtype))
    return model


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float, **extra) -> None:
    err = rel_err(actual, expected)
    status = "ok" if err <= tol else "FAIL"
    print(f"  parity {name:<58} rel err {err:.2e} (tol {tol:.0e}) {status}")
    ROWS.append(dict(kind="parity", name=name, rel_err=err, tol=tol, ok=err <= tol, **extra))


# ------------------------------------------------------------------------------------------ parity
@torch.no_grad()
def parity(preset: str, dtype: torch.dtype, device: torch.device, steps: int) -> None:
    model = random_model(preset, dtype, device)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (1, PROMPT + steps), generator=generator).to(device)
    prompt, fed = ids[:, :PROMPT], ids[:, PROMPT:]
    tol = TOLERANCE[dtype]
    label = f"{preset} {str(dtype).removeprefix('torch.')}"

    runner = DecodeRunner(model, cuda_graph=device.type == "cuda")
    fused_cache = runner.prepare(1, PROMPT + steps + 1)
    prefill(model, fused_cache, prompt)
    fused = torch.stack([runner.step(fed[:, i]).clone() for i in range(steps)], dim=1)

    with ops.backend("torch"):
        unfused_cache = model.allocate_cache(1)
        prefill(model, unfused_cache, prompt)
        unfused = torch.cat([model(fed[:, i : i + 1], cache=unfused_cache).logits for i in range(steps)], 1)
    full = model(ids).logits[:, PROMPT:]  # position PROMPT + i: after feeding fed[:, i]

    extra = dict(preset=preset, dtype=str(dtype), graphed=runner.graphed)
    check(f"{label}: fused decode vs unfused torch decode (logits)", fused, unfused, tol, **extra)
    check(f"{label}: fused decode vs full forward (logits)", fused, full, tol, **extra)
    states = lambda cache: torch.cat([s.ssm.flatten() for s in cache.states])
    convs = lambda cache: torch.cat([s.conv.flatten() for s in cache.states])
    check(f"{label}: SSM states after decode", states(fused_cache), states(unfused_cache), tol, **extra)
    check(f"{label}: conv states after decode", convs(fused_cache), convs(unfused_cache), tol, **extra)
    same = torch.equal(fused.argmax(-1), unfused.argmax(-1))
    print(f"  greedy tokens identical over {steps} steps: {same}")
    ROWS.append(dict(kind="greedy_match", preset=preset, dtype=str(dtype), identical=same))


# ----------------------------------------------------------------------------------- op counting
def count_ops(fn: Callable[[], object]) -> list[str]:
    """The operators ``fn`` dispatches, views and allocations left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if not getattr(func, "is_view", False) and name not in ALLOCATIONS:
                seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return seen


@torch.no_grad()
def step_ops(preset: str, dtype: torch.dtype, device: torch.device, n_layer: int, path: str) -> list[str]:
    model = random_model(preset, dtype, device, n_layer)
    cache = model.allocate_cache(1)
    prefill(model, cache, torch.tensor([[1, 2, 3]], device=device))
    token = torch.tensor([[4]], device=device)
    if path == "decode_step":
        run = lambda: decode_step(model, token, cache)
    else:
        run = lambda: model(token, cache=cache).logits
    run()  # compile the kernels outside the count
    return count_ops(run)


def ops_per_layer(preset: str, dtype: torch.dtype, device: torch.device) -> None:
    backend = "triton" if device.type == "cuda" or _interpreting() else "torch"
    with ops.backend(backend):
        for path in ("decode_step", "model.forward"):
            two = step_ops(preset, dtype, device, 2, path)
            three = step_ops(preset, dtype, device, 3, path)
            layer = collections.Counter(three)
            layer.subtract(collections.Counter(two))
            per_layer = {name: n for name, n in layer.items() if n}
            total = sum(per_layer.values())
            print(
                f"  ops per layer {preset:<12} {str(dtype):<15} {path:<14} {total:>3} "
                f"(backend {backend}): {per_layer}"
            )
            ROWS.append(
                dict(
                    kind="ops_per_layer",
                    preset=preset,
                    dtype=str(dtype),
                    path=path,
                    backend=backend,
                    per_layer=total,
                    ops=per_layer,
                    whole_step_2_layers=len(two),
                )
            )


def _interpreting() -> bool:
    from ssmkit.ops import dispatch

    return dispatch.triton_importable() and dispatch.triton_interpret()


# ------------------------------------------------------------------------------------------ timing
@torch.no_grad()
def graph_step_seconds(step: Callable[[], object], replays: int = 200, rounds: int = 5) -> float:
    """Median over rounds of the mean replay time of one captured step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(seconds)


def timing(preset: str, dtype: torch.dtype, copy_bw: float) -> None:
    device = torch.device("cuda")
    model = random_model(preset, dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = weights / copy_bw
    token = torch.tensor([[7]], device=device)
    for path in ("decode_step", "model.forward"):
        cache = model.allocate_cache(1)
        with torch.no_grad():
            prefill(model, cache, torch.randint(0, model.config.vocab_size, (1, PROMPT), device=device))
        if path == "decode_step":
            step = lambda: decode_step(model, token, cache)  # noqa: B023 - used within this iteration
        else:
            step = lambda: model(token, cache=cache)  # noqa: B023
        seconds = graph_step_seconds(step)
        ratio = seconds / floor
        print(
            f"  decode step b=1 {preset:<12} {str(dtype):<15} {path:<14} {seconds * 1e6:8.1f} us "
            f"(CUDA graph) = {ratio:.2f}x the weight-read floor ({floor * 1e6:.1f} us)"
        )
        ROWS.append(
            dict(
                kind="timing",
                preset=preset,
                dtype=str(dtype),
                path=path,
                us=seconds * 1e6,
                floor_us=floor * 1e6,
                vs_floor=ratio,
                weight_bytes=weights,
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--presets", nargs="+", default=["mamba2-130m", "mamba-130m"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=16, help="decode steps compared in the parity check")
    parser.add_argument("--count-only", action="store_true", help="only count the ops per layer (any device)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [getattr(torch, name) for name in args.dtypes]
    copy_bw = None
    if device.type == "cuda" and not args.count_only:
        from ssmkit.bench.ops_cuda import copy_bandwidth

        copy_bw = copy_bandwidth()
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    for preset in args.presets:
        for dtype in dtypes:
            print(f"{preset} {dtype}")
            ops_per_layer(preset, dtype, device)
            if args.count_only:
                continue
            parity(preset, dtype, device, args.steps)
            if copy_bw is not None:
                timing(preset, dtype, copy_bw)
    failed = [row for row in ROWS if row.get("kind") == "parity" and not row["ok"]]
    print(f"{len(failed)} parity check(s) failed" if failed else "all parity checks passed")
    if args.json:
        meta = dict(
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            copy_gbps=None if copy_bw is None else copy_bw / 1e9,
        )
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=ROWS), indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
