"""``ssmkit bench generate``: prefill and decode throughput of whole models, in one run.

Models (bf16): a Mamba-2 preset (``mamba2-130m`` by default), a hybrid preset (``granite-4.0-h-350m``),
and a Transformer of the same width built from our attention layers with a SwiGLU MLP and half the
layers (the Mamba papers' pairing: one attention + MLP layer holds the parameters of two Mamba
blocks, so both have about the same number of parameters); plus ``transformers``' Llama of that
same shape with SDPA attention and a static cache when ``transformers`` imports.

For each batch (1, 16, 64) and prompt length (2k, 8k, 32k): prefill tokens/s (prompt tokens /
seconds until the first token's logits), decode tokens/s (batch * steps / seconds of the remaining
greedy steps, CUDA-graph decode when it captures), and peak memory. Each case runs once to warm up
(compilation, autotuning, graph capture) and ``rounds`` times timed; the median is reported. A case
that runs out of memory is reported as such (it is a result: the Transformer's KV cache at batch 64
and 32k tokens does not fit on one 80 GB GPU).

Targets (issue 5): decode throughput of the Mamba-2 model at least 5x the Transformer's at 8k-token
prompts and batch 64; at batch 1 a decode step within 2x of the bandwidth floor, the time to read
every weight once at the measured device copy bandwidth.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ssmkit.bench.report import Row
from ssmkit.inference import DecodeRunner, generate
from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.config import AttentionConfig, MLPConfig

EXTRA_COLUMNS = ("batch", "prompt", "peak mem", "vs floor")
BATCHES = (1, 16, 64)
PROMPTS = (2048, 8192, 32768)
DECODE_STEPS = 128


@dataclass
class Case:
    model: str
    batch: int
    prompt: int


def transformer_config(reference: ModelConfig, *, head_dim: int = 64) -> ModelConfig:
    """A Llama-style Transformer with the width of ``reference`` and half its layers (each with
    attention and a SwiGLU MLP of ~8/3 d, rounded to 64), about as many parameters as a Mamba-2
    stack of the same width and reference.n_layer layers."""
    d = reference.d_model
    return ModelConfig(
        d_model=d,
        n_layer=max(1, reference.n_layer // 2),
        vocab_size=reference.vocab_size,
        pad_vocab_size_multiple=reference.pad_vocab_size_multiple,
        default_layer="attention",
        attention=AttentionConfig(num_heads=max(1, d // head_dim), head_dim=head_dim),
        mlp=MLPConfig(d_intermediate=64 * max(1, round(8 * d / 3 / 64))),
        tie_embeddings=reference.tie_embeddings,
    )


def model_configs(quick: bool, mamba2: str, hybrid: str) -> dict[str, ModelConfig]:
    if quick:
        base, hybrid_config = get_preset("tiny-mamba2"), get_preset("tiny-hybrid")
        return {
            "tiny-mamba2": base,
            "tiny-hybrid": hybrid_config,
            "transformer (tiny-mamba2 shape)": transformer_config(base, head_dim=16),
        }
    base = get_preset(mamba2)
    return {
        mamba2: base,
        hybrid: get_preset(hybrid),
        f"transformer ({mamba2} shape)": transformer_config(base),
    }


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (``parameters()`` yields a tied one once): what a batch-1 decode step
    must read."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Measured:
    prefill_seconds: float
    decode_step_seconds: float
    peak: str
    graphed: bool


def measure_ours(
    model: LanguageModel, runner: DecodeRunner, batch: int, prompt: int, steps: int, rounds: int
) -> Measured:
    """Median over ``rounds`` timed generate calls (after one warm-up) of greedy decoding."""
    device = model.embedding.weight.device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    prefills, steps_seconds = [], []
    graphed = False
    for round_ in range(rounds + 1):
        out = generate(model, ids, max_new_tokens=steps + 1, runner=runner)
        graphed = out.cuda_graph
        if round_ > 0:
            prefills.append(out.prefill_seconds)
            steps_seconds.append(out.decode_seconds / max(out.decode_steps, 1))
    return Measured(statistics.median(prefills), statistics.median(steps_seconds), _peak_gib(device), graphed)


def llama_model(config: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype):
    """transformers' Llama of the shape of ``config`` with SDPA attention (random weights)."""
    import transformers

    a = config.attention
    hf_config = transformers.LlamaConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp.d_intermediate,
        num_hidden_layers=config.n_layer,
        num_attention_heads=a.num_heads,
        num_key_value_heads=config.attention_kv_heads,
        head_dim=config.attention_head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=config.tie_embeddings,
    )
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


def measure_llama(model, batch: int, prompt: int, steps: int, rounds: int) -> Measured:
    """transformers' generate with a static cache: decode step = (T(steps + 1 tokens) - T(1 token)) /
    steps, prefill = T(1 token); medians over rounds after a warm-up of each."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    model.generation_config.eos_token_id = None

    def timed(new_tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
            )
        _sync(device)
        return time.perf_counter() - start

    timed(1), timed(steps + 1)  # warm-up: compilation, cache allocation
    ones, fulls = [], []
    for _ in range(rounds):
        ones.append(timed(1))
        fulls.append(timed(steps + 1))
    one, full = statistics.median(ones), statistics.median(fulls)
    return Measured(one, max(full - one, 0.0) / steps, _peak_gib(device), False)


def run(
    *,
    device: torch.device,
    quick: bool = False,
    rounds: int = 3,
    mamba2: str = "mamba2-130m",
    hybrid: str = "granite-4.0-h-350m",
    batches: tuple[int, ...] | None = None,
    prompts: tuple[int, ...] | None = None,
    steps: int | None = None,
    llama: bool = True,
    progress: bool = True,
    on_case: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Measure every (model, batch, prompt); ``on_case`` gets all rows so far after each one."""
    from rich.progress import Progress

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = batches or ((1, 3) if quick else BATCHES)
    prompts = prompts or ((16, 40) if quick else PROMPTS)
    steps = steps or (8 if quick else DECODE_STEPS)
    configs = model_configs(quick, mamba2, hybrid)
    bandwidth = None
    if device.type == "cuda":
        from ssmkit.bench.ops_cuda import copy_bandwidth

        bandwidth = copy_bandwidth()

    rows: list[Row] = []
    decode: dict[tuple[str, int, int], float] = {}  # (model, batch, prompt) -> decode step seconds
    makers: dict[str, Callable[[], object]] = {}
    for label, config in configs.items():
        makers[label] = lambda config=config: LanguageModel(config).to(device=device, dtype=dtype).eval()
    transformer_label = list(configs)[2]
    if llama and not quick:
        try:
            import transformers  # noqa: F401

            longest = max(prompts) + steps + 2
            makers["transformers Llama (SDPA, static cache)"] = lambda: llama_model(
                configs[transformer_label], longest, device, dtype
            )
        except ImportError:
            rows.append(Row("decode", "-", "transformers Llama", None, note="transformers is not installed"))

    total = len(makers) * len(batches) * len(prompts)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("generate", total=total)
        for label, make in makers.items():
            _reset_memory(device)
            torch.manual_seed(0)
            model = make()
            is_ours = isinstance(model, LanguageModel)
            runner = DecodeRunner(model) if is_ours else None
            weights = weight_bytes(model)
            for batch in batches:
                for prompt in prompts:
                    bar.update(task, description=f"{label} b={batch} prompt={prompt}")
                    size = f"b={batch} prompt={prompt}"
                    extra = {"batch": batch, "prompt": prompt}
                    _reset_memory(device)
                    try:
                        if is_ours:
                            m = measure_ours(model, runner, batch, prompt, steps, rounds)
                        else:
                            m = measure_llama(model, batch, prompt, steps, rounds)
                    except Exception as exc:  # noqa: BLE001 - an out-of-memory case is a result
                        if runner is not None:
                            runner.release()
                        note = (
                            "out of memory" if _is_oom(exc) else f"failed: {type(exc).__name__}: {exc}"[:200]
                        )
                        rows.append(Row("prefill", size, label, None, note=note, extra=extra))
                        rows.append(Row("decode", size, label, None, note=note, extra=extra))
                        bar.advance(task)
                        continue
                    extra["peak mem"] = m.peak
                    rows.append(
                        Row(
                            "prefill",
                            size,
                            label,
                            m.prefill_seconds,
                            tokens=batch * prompt,
                            extra=dict(extra),
                        )
                    )
                    decode_row = Row(
                        "decode",
                        size,
                        label,
                        m.decode_step_seconds,
                        tokens=batch,
                        note="CUDA graph" if m.graphed else "eager",
                        extra=dict(extra),
                    )
                    rows.append(decode_row)
                    decode[(label, batch, prompt)] = m.decode_step_seconds
                    if batch == 1 and bandwidth is not None:
                        floor = weights / bandwidth
                        ratio = m.decode_step_seconds / floor
                        decode_row.extra["vs floor"] = f"{ratio:.2f}x floor ({floor * 1e6:.0f} µs)"
                        if label == list(configs)[0]:
                            decode_row.target, decode_row.met = "<= 2x bandwidth floor", ratio <= 2.0
                    if on_case is not None:
                        on_case(rows)
                    bar.advance(task)
            del model, runner
    # Decode throughput ratios against the Transformer (ours, and transformers' Llama).
    ours = list(configs)[0]
    for row in rows:
        if row.op != "decode" or row.impl == ours or row.seconds is None:
            continue
        batch, prompt = row.extra["batch"], row.extra["prompt"]
        mine = decode.get((ours, batch, prompt))
        if mine:
            row.ratio, row.ratio_to = row.seconds / mine, ours
            if batch == 64 and prompt == 8192 and (row.impl == transformer_label or "Llama" in row.impl):
                row.target, row.met = f"{ours} >= 5x", row.ratio >= 5.0
    if bandwidth is not None:
        rows.append(
            Row("copy", "512 MiB device-to-device", "torch copy_", None, note=f"{bandwidth / 1e12:.2f} TB/s")
        )
    for label, config in configs.items():
        rows.append(
            Row(
                "weights",
                label,
                "bytes",
                None,
                note=f"{weight_bytes_of(config, dtype) / 2**20:.2f} MiB ({dtype})",
            )
        )
    return rows


def weight_bytes_of(config: ModelConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        return weight_bytes(LanguageModel(config).to(dtype))
