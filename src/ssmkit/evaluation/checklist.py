"""The production checklist: what a model must do before it is deployed, each line measured.

:func:`run_checklist` runs every check of :data:`CHECKS` on a model and returns one
:class:`CheckResult` per line (passed or not, the figure measured, the requirement). A check that
raises is a failed line carrying the exception, never a crash of the whole list.

| line | requirement |
| --- | --- |
| reset | ``cache.reset()`` restores the initial state exactly, and a rerun gives bitwise the same logits |
| memory_vs_length | memory does not grow with the length: cache bytes constant, peak memory sublinear |
| determinism | variance of the fp32 logits over ``runs`` (100) identical runs below 1e-6 |
| memory_leak | no memory growth over ``calls`` (100) prefill + decode calls |
| empty_prompt | an empty prompt raises a clear error (ValueError/TypeError), not an internal one |
| one_token | a one-token prompt runs, is finite and equals the first position of a longer prompt |
| long_prompt | a prompt longer than any seen in training runs, finite, and the cache-streamed logits agree |
| batch_1_and_64 | a batch of 64 runs and every row equals the same prompt run alone (batch of 1) |
| bf16_and_fp32 | the model runs in bf16 and fp32, finite, bf16 close to fp32 |
| same_seed | the same seed samples the same tokens (and the model builds to the same weights) |
"""

from __future__ import annotations

import copy
import gc
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ssmkit.evaluation.long_context import MemoryMeter, stream

logger = logging.getLogger(__name__)


@dataclass
class ChecklistConfig:
    """Sizes and thresholds. ``long_length``: None means 4x the training length when known, else 4096.
    ``memory_lengths``: the two stream lengths compared by memory_vs_length."""

    prompt_length: int = 64
    runs: int = 100
    calls: int = 100
    variance_threshold: float = 1e-6
    memory_lengths: tuple[int, int] = (1024, 8192)
    chunk: int = 512
    leak_tolerance_bytes: int | None = None  # None: 1 MiB on CUDA, 32 MiB on a CPU (resident memory)
    long_length: int | None = None
    large_batch: int = 64
    batch_prompt_length: int = 32
    batch_tolerance: float = 1e-4
    long_tolerance: float = 1e-3
    bf16_tolerance: float = 0.05
    sample_tokens: int = 32
    seed: int = 0


@dataclass
class CheckResult:
    name: str
    passed: bool
    measured: str
    requirement: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


class _Context:
    """What every check needs: the model, its device, vocabulary, a prompt, the config."""

    def __init__(self, model: nn.Module, config: ChecklistConfig, train_seq_len: int | None) -> None:
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.vocab = model.config.vocab_size
        self.train_seq_len = train_seq_len
        generator = torch.Generator().manual_seed(config.seed)
        self.prompt = torch.randint(0, self.vocab, (1, config.prompt_length), generator=generator).to(
            self.device
        )

    def random_ids(self, batch: int, length: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab, (batch, length), generator=generator).to(self.device)


def _state_tensors(cache: Any) -> list[torch.Tensor]:
    tensors = []
    for state in cache.states:
        for name in ("conv", "ssm", "key", "value"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    return tensors


# ---------------------------------------------------------------- the checks
def check_reset(ctx: _Context) -> CheckResult:
    model, prompt = ctx.model, ctx.prompt
    cache = model.allocate_cache(1)
    initial = [t.detach().clone() for t in _state_tensors(cache)]
    first = model(prompt, cache=cache).logits
    moved = any(not torch.equal(a, b) for a, b in zip(initial, _state_tensors(cache)))
    cache.reset()
    after = _state_tensors(cache)
    same_shape = [a.shape == b.shape for a, b in zip(initial, after)]
    state_diff = (
        max(
            ((a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
            for a, b in zip(initial, after)
            if a.shape == b.shape
        )
        if initial
        else 0.0
    )
    restored = (
        len(initial) == len(after) and all(same_shape) and state_diff == 0.0 and cache.seqlen_offset == 0
    )
    second = model(prompt, cache=cache).logits
    logits_diff = (first - second).abs().max().item()
    passed = restored and logits_diff == 0.0 and moved
    return CheckResult(
        "reset",
        passed,
        f"max |state - initial| {state_diff:.1e}, offset {cache.seqlen_offset - prompt.shape[1]}, "
        f"rerun max |diff| {logits_diff:.1e}" + ("" if moved else " (the prompt did not change the state)"),
        "state == initial exactly; rerun logits bitwise equal",
        {"state_diff": state_diff, "logits_diff": logits_diff, "state_changed_by_prompt": moved},
    )


def check_memory_vs_length(ctx: _Context) -> CheckResult:
    short, long = sorted(ctx.config.memory_lengths)
    chunk = ctx.config.chunk
    stream(
        ctx.model, ctx.random_ids(1, min(short, 2 * chunk), 1), chunk=chunk, shift_threshold=None
    )  # warm-up
    reports = [
        stream(ctx.model, ctx.random_ids(1, length, 2), chunk=chunk, shift_threshold=None)
        for length in (short, long)
    ]
    ratio = long / short

    def exponent(a: int, b: int) -> float:
        return math.log(max(b, 1) / max(a, 1)) / math.log(ratio)

    cache_exp = exponent(reports[0].cache_bytes, reports[1].cache_bytes)
    peak_exp = exponent(reports[0].peak_memory_bytes, reports[1].peak_memory_bytes)
    # Sublinear: memory ~ length^k with k < 0.5 (an SSM measures ~0; a KV cache 1).
    passed = cache_exp < 0.5 and peak_exp < 0.5
    mib = 2**20
    return CheckResult(
        "memory_vs_length",
        passed,
        f"x{ratio:g} length: cache {reports[0].cache_bytes / 1024:.1f} -> "
        f"{reports[1].cache_bytes / 1024:.1f} KiB "
        f"(exponent {cache_exp:.2f}), peak {reports[0].peak_memory_bytes / mib:.0f} -> "
        f"{reports[1].peak_memory_bytes / mib:.0f} MiB (exponent {peak_exp:.2f})",
        "memory ~ length^k with k < 0.5 (cache and peak)",
        {"lengths": [short, long], "reports": [r.to_dict() for r in reports]},
    )


def check_determinism(ctx: _Context) -> CheckResult:
    model = ctx.model
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    runs = ctx.config.runs
    # Running sums in fp64: the variance of 100 runs without keeping 100 copies of the logits.
    total = squares = None
    for _ in range(runs):
        logits = model(ctx.prompt).logits.double()
        total = logits if total is None else total + logits
        squares = logits.square() if squares is None else squares + logits.square()
    mean = total / runs
    variance = (squares / runs - mean.square()).clamp_min(0).max().item()
    threshold = ctx.config.variance_threshold
    return CheckResult(
        "determinism",
        variance < threshold,
        f"max variance over {runs} runs {variance:.1e}",
        f"< {threshold:g} (fp32)",
        {"max_variance": variance, "runs": runs},
    )


def check_memory_leak(ctx: _Context) -> CheckResult:
    model, prompt = ctx.model, ctx.prompt
    meter = MemoryMeter(ctx.device)

    def call() -> None:
        cache = model.allocate_cache(1)
        logits = model(prompt, cache=cache).logits
        model(logits[:, -1:].argmax(-1), cache=cache)

    def current() -> int:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
            return torch.cuda.memory_allocated(ctx.device)
        return meter.sample()

    for _ in range(3):  # warm-up: lazy imports, allocator pools
        call()
    before = current()
    for _ in range(ctx.config.calls):
        call()
    after = current()
    tolerance = ctx.config.leak_tolerance_bytes
    if tolerance is None:
        tolerance = 2**20 if ctx.device.type == "cuda" else 32 * 2**20
    growth = after - before
    return CheckResult(
        "memory_leak",
        growth <= tolerance,
        f"{growth / 2**20:+.2f} MiB over {ctx.config.calls} calls "
        f"({'allocated' if ctx.device.type == 'cuda' else 'resident'})",
        f"growth <= {tolerance / 2**20:g} MiB",
        {"before": before, "after": after, "calls": ctx.config.calls},
    )


def check_empty_prompt(ctx: _Context) -> CheckResult:
    empty = torch.zeros(1, 0, dtype=torch.long, device=ctx.device)
    try:
        out = ctx.model(empty)
    except (ValueError, TypeError) as err:
        return CheckResult(
            "empty_prompt", True, f"{type(err).__name__}: {str(err)[:80]}", "ValueError/TypeError"
        )
    except Exception as err:  # any other exception type is the unclear error this line looks for
        return CheckResult(
            "empty_prompt",
            False,
            f"{type(err).__name__} (not a clear error): {str(err)[:80]}",
            "ValueError/TypeError",
        )
    shape = tuple(out.logits.shape) if hasattr(out, "logits") else type(out).__name__
    return CheckResult("empty_prompt", False, f"no error, returned {shape}", "ValueError/TypeError")


def check_one_token(ctx: _Context) -> CheckResult:
    model, prompt = ctx.model, ctx.prompt
    one = model(prompt[:, :1]).logits
    full = model(prompt).logits
    error = _relative_error(one[:, 0], full[:, 0])
    cache = model.allocate_cache(1)
    cached = model(prompt[:, :1], cache=cache).logits
    step = model(prompt[:, 1:2], cache=cache).logits
    step_error = _relative_error(step[:, 0], full[:, 1])
    finite = bool(torch.isfinite(one).all() and torch.isfinite(cached).all() and torch.isfinite(step).all())
    tolerance = ctx.config.batch_tolerance
    return CheckResult(
        "one_token",
        finite and error <= tolerance and step_error <= 10 * tolerance,
        f"finite {finite}, rel. error vs long prompt {error:.1e}, then one decode step {step_error:.1e}",
        f"finite, <= {tolerance:g} (decode step <= {10 * tolerance:g})",
        {"error": error, "step_error": step_error},
    )


def check_long_prompt(ctx: _Context) -> CheckResult:
    config = ctx.config
    length = config.long_length or (4 * ctx.train_seq_len if ctx.train_seq_len else 4096)
    ids = ctx.random_ids(1, length, 3)
    full = ctx.model(ids).logits
    cache = ctx.model.allocate_cache(1)
    pieces = [
        ctx.model(ids[:, s : s + config.chunk], cache=cache).logits for s in range(0, length, config.chunk)
    ]
    streamed = torch.cat(pieces, dim=1)
    finite = bool(torch.isfinite(full).all() and torch.isfinite(streamed).all())
    error = _relative_error(streamed, full)
    where = f"{length} tokens" + (
        f" ({length // ctx.train_seq_len}x training length)" if ctx.train_seq_len else ""
    )
    return CheckResult(
        "long_prompt",
        finite and error <= config.long_tolerance,
        f"{where}: finite {finite}, streamed vs whole rel. error {error:.1e}",
        f"finite, <= {config.long_tolerance:g}",
        {"length": length, "error": error},
    )


def check_batches(ctx: _Context) -> CheckResult:
    config = ctx.config
    ids = ctx.random_ids(config.large_batch, config.batch_prompt_length, 4)
    batched = ctx.model(ids).logits
    worst = 0.0
    for row in range(ids.shape[0]):
        alone = ctx.model(ids[row : row + 1]).logits
        worst = max(worst, _relative_error(batched[row : row + 1], alone))
    finite = bool(torch.isfinite(batched).all())
    return CheckResult(
        "batch_1_and_64",
        finite and worst <= config.batch_tolerance,
        f"batch {config.large_batch} finite {finite}, worst row vs batch 1 rel. error {worst:.1e}",
        f"finite, <= {config.batch_tolerance:g}",
        {"worst_error": worst},
    )


def check_dtypes(ctx: _Context) -> CheckResult:
    fp32 = copy.deepcopy(ctx.model).float()
    bf16 = copy.deepcopy(ctx.model).to(torch.bfloat16)
    reference = fp32(ctx.prompt).logits
    low = bf16(ctx.prompt).logits
    finite = bool(torch.isfinite(reference).all() and torch.isfinite(low).all())
    error = _relative_error(low.float(), reference)
    agree = (low.float().argmax(-1) == reference.argmax(-1)).float().mean().item()
    tolerance = ctx.config.bf16_tolerance
    return CheckResult(
        "bf16_and_fp32",
        finite and error <= tolerance,
        f"finite {finite}, bf16 vs fp32 rel. error {error:.1e}, top-1 agreement {agree:.1%}",
        f"finite, <= {tolerance:g}",
        {"error": error, "top1_agreement": agree},
    )


def sample(model: nn.Module, prompt: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """``steps`` tokens sampled (temperature 1) after ``prompt``: (batch, length), through the cache,
    with a generator seeded by ``seed``. Returns (batch, steps)."""
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = model.allocate_cache(prompt.shape[0])
    logits = model(prompt, cache=cache).logits[:, -1]
    out = []
    for _ in range(steps):
        probs = torch.softmax(logits.float(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        out.append(token)
        logits = model(token, cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


def check_same_seed(ctx: _Context, rebuild: Callable[[], nn.Module] | None) -> CheckResult:
    steps, seed = ctx.config.sample_tokens, ctx.config.seed
    first = sample(ctx.model, ctx.prompt, steps, seed)
    second = sample(ctx.model, ctx.prompt, steps, seed)
    same = torch.equal(first, second)
    weights = "not applicable (loaded weights)"
    same_weights = True
    if rebuild is not None:
        a, b = rebuild().state_dict(), rebuild().state_dict()
        same_weights = all(torch.equal(a[k], b[k]) for k in a)
        weights = "identical" if same_weights else "different"
    return CheckResult(
        "same_seed",
        same and same_weights,
        f"2 x {steps} sampled tokens {'identical' if same else 'different'}; rebuilt weights {weights}",
        "identical",
        {"tokens_identical": same, "weights_identical": same_weights},
    )


CHECKS: dict[str, Callable[..., CheckResult]] = {
    "reset": check_reset,
    "memory_vs_length": check_memory_vs_length,
    "determinism": check_determinism,
    "memory_leak": check_memory_leak,
    "empty_prompt": check_empty_prompt,
    "one_token": check_one_token,
    "long_prompt": check_long_prompt,
    "batch_1_and_64": check_batches,
    "bf16_and_fp32": check_dtypes,
    "same_seed": check_same_seed,
}


@torch.no_grad()
def run_checklist(
    model: nn.Module,
    config: ChecklistConfig | None = None,
    *,
    train_seq_len: int | None = None,
    rebuild: Callable[[], nn.Module] | None = None,
    only: list[str] | None = None,
    callback: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run the checklist on ``model`` (a :class:`ssmkit.models.LanguageModel` or any model with
    ``config.vocab_size``, ``allocate_cache`` and the cache contract).

    train_seq_len: the longest length seen in training (the long-prompt line uses 4x it).
    rebuild: builds the model again from its seed (presets), for the same-seed line's weight test.
    only: names from :data:`CHECKS` to run (default all)."""
    config = config or ChecklistConfig()
    names = list(CHECKS) if only is None else only
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
    was_training = model.training
    model.eval()
    ctx = _Context(model, config, train_seq_len)
    results = []
    try:
        for name in names:
            try:
                result = CHECKS[name](ctx, rebuild) if name == "same_seed" else CHECKS[name](ctx)
            except Exception as err:  # a check that crashes is a failed line with the reason shown
                logger.exception("check %s raised", name)
                result = CheckResult(name, False, f"raised {type(err).__name__}: {str(err)[:100]}", "runs")
            results.append(result)
            if callback is not None:
                callback(result)
    finally:
        model.train(was_training)
    return results
