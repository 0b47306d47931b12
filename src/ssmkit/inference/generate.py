"""Generation: prefill the prompts, then decode one token per step, batched or streamed.

Prefill runs the chunked kernels (``LanguageModel.forward`` on a cache, which keeps the final
states), in chunks of ``prefill_chunk_size`` tokens so that a long prompt needs activation memory
for one chunk only. Decoding feeds one token per row per step through the step kernels
(``selective_state_update``, ``causal_conv1d_update``), via a :class:`DecodeRunner` that replays a
CUDA graph when it can.

Prompts of different lengths: padding never enters an SSM state because there is none. Prompts
are prefilled in groups of equal length, each group into its own small cache, and the groups'
final states are copied into the rows of one batch cache (``InferenceCache.copy_rows_``); the
attention layers' preallocated caches hold one length per row and mask the rest. Every row then
decodes exactly as it would alone.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ssmkit.inference.graphs import DecodeRunner, runner_for
from ssmkit.inference.sampling import SamplingParams, sample_next
from ssmkit.models.cache import InferenceCache

PromptsLike = torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | Sequence[torch.Tensor]

# Prefill chunks hold about this many tokens over the whole batch (rounded to a multiple of 256 per
# row): the logits of a chunk, batch * chunk * vocab, are the largest activation of a forward pass.
PREFILL_TOKENS_PER_CHUNK = 16384


@dataclass
class GenerationOutput:
    """sequences[i]: the tokens generated for prompt i (a stop token, when one ended it, included).
    finish_reasons[i]: "stop" or "length". Timings cover prefill (prompts -> first token's logits)
    and decode (the remaining steps), each ended by a device synchronisation."""

    sequences: list[list[int]]
    finish_reasons: list[str]
    prompt_lengths: list[int]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    cuda_graph: bool = False

    @property
    def num_generated(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_lengths) / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens after the first (the first comes from the prefill) per decode second."""
        tokens = self.num_generated - len(self.sequences)
        return tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def padded(self, pad_id: int = 0) -> torch.Tensor:
        """(batch, longest) int64: the sequences right-padded with ``pad_id``."""
        longest = max((len(s) for s in self.sequences), default=0)
        out = torch.full((len(self.sequences), longest), pad_id, dtype=torch.int64)
        for row, seq in enumerate(self.sequences):
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        return out


def as_prompts(prompts: PromptsLike) -> list[torch.Tensor]:
    """Normalise prompts to a list of 1-D int64 CPU tensors: a (batch, seqlen) or (seqlen,) tensor, a
    list of token ids, or a list of such lists or 1-D tensors (lengths may differ)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must have an integer dtype (int32, int64), got {prompts.dtype}")
        if prompts.dim() == 1:
            rows = [prompts]
        elif prompts.dim() == 2:
            rows = list(prompts)
        else:
            raise ValueError(
                f"input_ids must have shape (batch, seqlen) or (seqlen,), got {tuple(prompts.shape)}"
            )
    else:
        items = list(prompts)
        if not items:
            raise ValueError("prompts must hold at least one prompt, got an empty list")
        if all(isinstance(t, int) for t in items):
            rows = [torch.tensor(items)]
        else:
            rows = [torch.as_tensor(t) for t in items]
    out = []
    for i, row in enumerate(rows):
        if row.dim() != 1 or row.numel() == 0 or row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(
                f"prompt {i} must be a non-empty 1-D sequence of token ids, got shape {tuple(row.shape)} "
                f"and dtype {row.dtype}"
            )
        out.append(row.detach().to("cpu", torch.int64))
    return out


def default_chunk_size(batch: int) -> int:
    per_row = PREFILL_TOKENS_PER_CHUNK // max(batch, 1)
    return max(256, per_row // 256 * 256)


@torch.no_grad()
def prefill(
    model: nn.Module, cache: InferenceCache, input_ids: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Run input_ids: (batch, seqlen) through ``model`` from the states in ``cache`` (advanced in
    place), ``chunk_size`` tokens at a time (None: ``default_chunk_size(batch)``). Activation memory
    is that of one chunk; the final states are those of one pass over the whole sequence.

    Returns the logits of the last position: (batch, vocab).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape (batch, seqlen) with seqlen >= 1, got {tuple(input_ids.shape)}"
        )
    batch, seqlen = input_ids.shape
    chunk_size = chunk_size or default_chunk_size(batch)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    last = None
    for start in range(0, seqlen, chunk_size):
        logits = model(input_ids[:, start : start + chunk_size], cache=cache).logits
        last = logits[:, -1]
    return last


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Session:
    """One generation: prefill, then next tokens one step at a time (all on the device)."""

    def __init__(
        self,
        model: nn.Module,
        prompts: PromptsLike,
        *,
        max_new_tokens: int,
        params: SamplingParams,
        stop_token_ids: Sequence[int] | int | None,
        seed: int | None,
        prefill_chunk_size: int | None,
        cuda_graph: bool | None,
        runner: DecodeRunner | None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        params.validate()
        self.model, self.params, self.max_new_tokens = model, params, max_new_tokens
        self.prompts = as_prompts(prompts)
        self.batch = len(self.prompts)
        weight = model.embedding.weight
        self.device = weight.device
        vocab_rows = weight.shape[0]
        for i, prompt in enumerate(self.prompts):
            if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_rows:
                raise ValueError(
                    f"prompt {i} must hold token ids in 0..{vocab_rows - 1}, got ids from "
                    f"{int(prompt.min())} to {int(prompt.max())}"
                )
        if isinstance(stop_token_ids, int):
            stop_token_ids = [stop_token_ids]
        self.stop = torch.tensor(list(stop_token_ids or []), dtype=torch.int64, device=self.device)
        self.runner = runner if runner is not None else runner_for(model, cuda_graph=cuda_graph)
        self.prefill_chunk_size = prefill_chunk_size
        self.generator = torch.Generator(device=self.device)
        # Without a seed, draw one from torch's global generator: torch.manual_seed still reproduces.
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        self.seen: torch.Tensor | None = None
        self.finished = torch.zeros(self.batch, dtype=torch.bool, device=self.device)

    @property
    def prompt_lengths(self) -> list[int]:
        return [p.numel() for p in self.prompts]

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens (batch,) and whether each row was still alive (batch,) bool; updates the
        repetition history and the finished rows, on the device."""
        if self.params.uses_history and self.seen is None:
            self.seen = torch.zeros(self.batch, logits.shape[-1], dtype=torch.bool, device=self.device)
            for row, prompt in enumerate(self.prompts):
                self.seen[row, prompt.to(self.device)] = True
        tokens = sample_next(logits, self.params, generator=self.generator, seen=self.seen)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        alive = ~self.finished
        if self.stop.numel():
            self.finished |= torch.isin(tokens, self.stop)
        return tokens, alive

    @torch.no_grad()
    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill every prompt and choose the first new tokens."""
        longest = max(self.prompt_lengths)
        cache = self.runner.prepare(self.batch, longest + self.max_new_tokens)
        groups: dict[int, list[int]] = defaultdict(list)
        for row, prompt in enumerate(self.prompts):
            groups[prompt.numel()].append(row)
        first = None
        for rows in groups.values():
            ids = torch.stack([self.prompts[r] for r in rows]).to(self.device)
            # A growing KV cache for the prefill (flash attention, no mask over unused positions);
            # its keys and values are then copied into the preallocated decode cache.
            group_cache = InferenceCache.allocate(self.model, len(rows))
            last = prefill(self.model, group_cache, ids, chunk_size=self.prefill_chunk_size)
            cache.copy_rows_(rows, group_cache)
            del group_cache
            if first is None:
                first = last.new_empty(self.batch, last.shape[-1])
            first[torch.tensor(rows, device=self.device)] = last
        return self._choose(first)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the previous tokens (batch,) and choose the next ones."""
        return self._choose(self.runner.step(tokens))


def _session(model: nn.Module, prompts: PromptsLike, **kwargs) -> _Session:
    params = SamplingParams(
        temperature=kwargs.pop("temperature"),
        top_k=kwargs.pop("top_k"),
        top_p=kwargs.pop("top_p"),
        min_p=kwargs.pop("min_p"),
        repetition_penalty=kwargs.pop("repetition_penalty"),
    )
    return _Session(model, prompts, params=params, **kwargs)


def generate(
    model: nn.Module,
    prompts: PromptsLike,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_token_ids: Sequence[int] | int | None = None,
    seed: int | None = None,
    prefill_chunk_size: int | None = None,
    cuda_graph: bool | None = None,
    runner: DecodeRunner | None = None,
    check_every: int = 8,
) -> GenerationOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    prompts: input_ids (batch, seqlen) or (seqlen,) int, a list of token ids, or a list of prompts
    of any lengths (each gets exactly the tokens it would get alone). temperature 0 is greedy;
    top_k, top_p, min_p, repetition_penalty: see :class:`SamplingParams`. A row ends after emitting
    one of ``stop_token_ids``. seed fixes the sampling (None: drawn from torch's global generator).
    prefill_chunk_size: prompt tokens per row per forward call (None: about 16k tokens per call over
    the batch). cuda_graph: None captures the decode step on CUDA, False never (see DecodeRunner).
    check_every: with stop tokens, every this many steps the host checks whether all rows have
    finished (each check waits for the device; between checks the loop never does).
    """
    session = _session(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_token_ids=stop_token_ids,
        seed=seed,
        prefill_chunk_size=prefill_chunk_size,
        cuda_graph=cuda_graph,
        runner=runner,
    )
    device = session.device
    out = torch.full((session.batch, max_new_tokens), -1, dtype=torch.int64, device=device)
    _sync(device)
    begin = time.perf_counter()
    tokens, alive = session.start()
    out[:, 0] = torch.where(alive, tokens, -1)
    _sync(device)
    prefill_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    steps = 0
    for step in range(1, max_new_tokens):
        if session.stop.numel() and (step - 1) % check_every == 0 and bool(session.finished.all()):
            break
        tokens, alive = session.step(tokens)
        out[:, step] = torch.where(alive, tokens, -1)
        steps += 1
    table = out.cpu()  # waits for the device: the decode time ends here
    decode_seconds = time.perf_counter() - begin
    stop_ids = set(session.stop.tolist())
    sequences, reasons = [], []
    for row in table.tolist():
        seq = [t for t in row if t >= 0]
        sequences.append(seq)
        reasons.append("stop" if seq and seq[-1] in stop_ids else "length")
    return GenerationOutput(
        sequences=sequences,
        finish_reasons=reasons,
        prompt_lengths=session.prompt_lengths,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        decode_steps=steps,
        cuda_graph=session.runner.graphed,
    )


def stream(
    model: nn.Module,
    prompts: PromptsLike,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_token_ids: Sequence[int] | int | None = None,
    seed: int | None = None,
    prefill_chunk_size: int | None = None,
    cuda_graph: bool | None = None,
    runner: DecodeRunner | None = None,
) -> Iterator[list[int | None]]:
    """Like :func:`generate`, but yields each step's tokens as soon as they are chosen: one list per
    step with the new token of every prompt, or None for a prompt that has already finished. Stops
    when every prompt has finished or after ``max_new_tokens`` steps; the same arguments give the
    same tokens as generate."""
    session = _session(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_token_ids=stop_token_ids,
        seed=seed,
        prefill_chunk_size=prefill_chunk_size,
        cuda_graph=cuda_graph,
        runner=runner,
    )
    tokens, alive = session.start()
    for step in range(max_new_tokens):
        if step > 0:
            tokens, alive = session.step(tokens)
        # One host copy per step: a stream hands every token over as it comes.
        values, flags = tokens.tolist(), alive.tolist()
        yield [value if flag else None for value, flag in zip(values, flags)]
        if session.stop.numel() and bool(session.finished.all()):
            return
