"""Perplexity and bits per byte/character of a language model on a text.

Two ways to score a long text with a model of bounded context:

- ``"streaming"``: the text goes through the model's inference cache ``chunk`` tokens at a time;
  every token is predicted from the whole text before it (an SSM carries its fixed-size state; an
  attention layer its growing key/value cache). One pass, the cheapest, and the natural mode for
  a recurrent model.
- ``"sliding"``: windows of ``context`` tokens, advanced by ``stride``; each window scores only the
  tokens the previous window did not, so each token sees at least ``context - stride`` tokens of
  context (the Hugging Face perplexity recipe). No cache; works with any causal model.

Either way every token but the first is scored exactly once (the first has nothing to be predicted
from). Bits per byte and per character divide the summed negative log-likelihood (in bits) by the
UTF-8 bytes and the characters of the scored text, so models with different tokenizers compare.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("streaming", "sliding")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): any text, no training. The default for presets, whose
    models come with no tokenizer."""

    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass
class PerplexityResult:
    """tokens: tokens scored (all but the first). nll: summed negative log-likelihood in nats.
    loss: nats per token; bits_per_token; perplexity = exp(loss). bytes/chars: UTF-8 bytes and
    characters of the scored text, with bits_per_byte / bits_per_char (None when unknown, e.g. token
    files without a tokenizer)."""

    mode: str
    tokens: int
    nll: float
    loss: float
    perplexity: float
    bits_per_token: float
    bytes: int | None
    chars: int | None
    bits_per_byte: float | None
    bits_per_char: float | None
    context: int | None
    stride: int | None
    chunk: int | None
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_tokens(tokens: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a tensor of shape (num_tokens,), got {shape}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must have an integer dtype (int32, int64), got {tokens.dtype}")
    if tokens.numel() < 2:
        raise ValueError(f"tokens must hold at least 2 tokens (one to predict from), got {tokens.numel()}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        top = int(tokens.max())
        if top >= vocab or int(tokens.min()) < 0:
            raise ValueError(
                f"tokens must be ids in [0, {vocab}) (the model's vocab_size), got ids up to {top}: "
                "is the tokenizer the model's?"
            )
    return tokens.long()


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross entropy, in fp64 accumulation (logits are upcast to fp32 first)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, targets, reduction="sum").double().item()


@torch.no_grad()
def streaming_nll(model: nn.Module, tokens: torch.Tensor, *, chunk: int = 1024) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of ``tokens``: (num_tokens,) streamed through the cache.

    The last logit of a chunk predicts the first token of the next one, so every token after the
    first is scored once, with the whole prefix as context."""
    tokens = _check_tokens(tokens, model)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = next(model.parameters()).device
    cache = model.allocate_cache(1)
    total, count = 0.0, 0
    previous_last: torch.Tensor | None = None  # (1, vocab): the prediction for the next chunk's first token
    for start in range(0, tokens.numel(), chunk):
        piece = tokens[start : start + chunk].to(device)
        logits = model(piece[None], cache=cache).logits[0]  # (len, vocab)
        if previous_last is not None:
            total += _nll(previous_last, piece[:1])
            count += 1
        if piece.numel() > 1:
            total += _nll(logits[:-1], piece[1:])
            count += piece.numel() - 1
        previous_last = logits[-1:]
    return total, count


@torch.no_grad()
def sliding_nll(
    model: nn.Module, tokens: torch.Tensor, *, context: int = 1024, stride: int = 512
) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of ``tokens``: (num_tokens,) with sliding windows.

    The first window is the first ``context`` tokens and scores all of them but token 0; every next
    window ends ``stride`` tokens later, is ``context`` tokens long and scores only its last
    ``stride`` tokens, so a scored token has at least ``context - stride`` tokens before it (fewer
    in the first window). ``stride < context``: the first token a window scores needs one before it."""
    tokens = _check_tokens(tokens, model)
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, context - 1] = [1, {context - 1}], got {stride}")
    device = next(model.parameters()).device
    n = tokens.numel()
    total, count = 0.0, 0
    scored_from, end = 1, min(context, n)  # this window scores tokens [scored_from, end)
    while True:
        begin = max(0, end - context)
        window = tokens[begin:end].to(device)
        logits = model(window[None]).logits[0]
        # logits[i] predicts window[i + 1]: the targets window[scored_from - begin:] need the logits
        # one position earlier.
        total += _nll(logits[scored_from - begin - 1 : -1], window[scored_from - begin :])
        count += end - scored_from
        if end == n:
            return total, count
        scored_from, end = end, min(end + stride, n)


def evaluate_perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    mode: str = "streaming",
    context: int = 1024,
    stride: int = 512,
    chunk: int = 1024,
    decode: Any = None,
) -> PerplexityResult:
    """Score ``tokens``: (num_tokens,) ids with ``model`` (see the module docstring for the modes).

    decode: the tokenizer's ``decode`` (list[int] -> str), to count the bytes and characters of the
    scored text; without it bits per byte/character are None."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    if mode == "streaming":
        nll, count = streaming_nll(model, tokens, chunk=chunk)
    else:
        nll, count = sliding_nll(model, tokens, context=context, stride=stride)
    seconds = time.perf_counter() - started
    model.train(was_training)
    nbytes = nchars = None
    if decode is not None:
        # The scored text is everything after the first token.
        ids = tokens.tolist()
        whole, first = decode(ids), decode(ids[:1])
        nbytes = len(whole.encode("utf-8")) - len(first.encode("utf-8"))
        nchars = len(whole) - len(first)
    loss = nll / count
    bits = nll / math.log(2)
    return PerplexityResult(
        mode=mode,
        tokens=count,
        nll=nll,
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else float("inf"),
        bits_per_token=loss / math.log(2),
        bytes=nbytes,
        chars=nchars,
        bits_per_byte=bits / nbytes if nbytes else None,
        bits_per_char=bits / nchars if nchars else None,
        context=context if mode == "sliding" else None,
        stride=stride if mode == "sliding" else None,
        chunk=chunk if mode == "streaming" else None,
        seconds=seconds,
        tokens_per_s=count / seconds if seconds > 0 else float("nan"),
    )


def load_tokens(
    data: str, tokenizer: Any, *, tail: float | None = None, max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids of a data file: a UTF-8 text (encoded with ``tokenizer``) or a ``.npy``/``.bin``
    token file. ``tail``: keep only the last fraction (e.g. 0.1, the trainer's validation split);
    ``max_tokens``: then keep the first ``max_tokens`` of what remains. Returns (num_tokens,) int64."""
    from pathlib import Path

    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix in (".npy", ".bin"):
        from ssmkit.data import open_tokens

        ids = torch.from_numpy(open_tokens(path).tokens[:].astype("int64"))
    else:
        if tokenizer is None:
            raise ValueError(f"{path} is a text file: a tokenizer is needed to encode it")
        ids = torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8")), dtype=torch.long)
    if tail is not None:
        if not 0.0 < tail <= 1.0:
            raise ValueError(f"tail must be in (0, 1], got {tail}")
        ids = ids[int(ids.numel() * (1.0 - tail)) :]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids
