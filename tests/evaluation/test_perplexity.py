"""Perplexity: streaming and sliding scores against the model's own loss and a brute-force bigram
evaluation, byte/char accounting, model loading (preset, training run), errors, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssmkit.evaluation.loading import load_model
from ssmkit.evaluation.perplexity import (
    ByteTokenizer,
    evaluate_perplexity,
    load_tokens,
    sliding_nll,
    streaming_nll,
)
from ssmkit.models import LanguageModel, get_preset

PRESETS = ["tiny-mamba1", "tiny-mamba2", "tiny-s4", "tiny-hybrid"]


def _model(preset: str, device: torch.device, dtype: torch.dtype = torch.float64) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(get_preset(preset)).to(device=device, dtype=dtype).eval()


def _tokens(n: int, vocab: int = 101, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_streaming_and_full_context_sliding_equal_the_model_loss(preset: str, device: torch.device) -> None:
    """Every token but the first, each once, from its whole prefix: the model's own mean loss."""
    model = _model(preset, device)
    tokens = _tokens(77)
    with torch.no_grad():
        expected = model(tokens[None].to(device), labels=tokens[None].to(device)).loss.item() * 76
    for chunk in (1, 13, 77, 200):
        nll, count = streaming_nll(model, tokens, chunk=chunk)
        assert count == 76
        assert abs(nll - expected) <= 1e-9 * abs(expected), (chunk, nll, expected)
    nll, count = sliding_nll(model, tokens, context=128, stride=64)
    assert count == 76 and abs(nll - expected) <= 1e-9 * abs(expected)


def test_sliding_with_a_two_token_window_is_a_bigram_score(device: torch.device) -> None:
    """context 2, stride 1: token t is predicted from token t-1 alone — brute force over all pairs."""
    model = _model("tiny-mamba2", device)
    tokens = _tokens(23, seed=4)
    pairs = torch.stack([tokens[:-1], tokens[1:]], dim=1).to(device)  # (22, 2)
    with torch.no_grad():
        logits = model(pairs).logits[:, 0].double()
    expected = torch.nn.functional.cross_entropy(logits, pairs[:, 1], reduction="sum").item()
    nll, count = sliding_nll(model, tokens, context=2, stride=1)
    assert count == 22 and abs(nll - expected) <= 1e-9 * expected


@pytest.mark.parametrize(("context", "stride"), [(16, 15), (16, 5), (31, 1), (40, 39), (56, 3), (57, 1)])
def test_sliding_scores_every_token_once(context: int, stride: int, device: torch.device) -> None:
    model = _model("tiny-s4", device)
    tokens = _tokens(57, seed=1)
    nll, count = sliding_nll(model, tokens, context=context, stride=stride)
    assert count == 56 and math.isfinite(nll)
    # The windowed score equals the full-context one exactly when the first window covers everything.
    full, _ = streaming_nll(model, tokens)
    assert (abs(nll - full) < 1e-9 * full) == (context >= 57)


def test_bits_per_byte_and_per_character() -> None:
    model = _model("tiny-mamba1", torch.device("cpu"), torch.float32)
    text = "héllo wörld, ça va? " * 3  # multi-byte characters: bytes != characters
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    result = evaluate_perplexity(model, ids, decode=lambda seq: "".join(chars[i] for i in seq))
    bits = result.nll / math.log(2)
    assert result.tokens == len(text) - 1
    assert result.chars == len(text) - 1
    assert result.bytes == len(text.encode()) - len(text[0].encode())
    assert result.bits_per_char == pytest.approx(bits / result.chars)
    assert result.bits_per_byte == pytest.approx(bits / result.bytes)
    assert result.bits_per_char == pytest.approx(result.bits_per_token)  # one token per character
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.mode == "streaming" and result.chunk == 1024 and result.context is None


def test_byte_tokenizer_round_trip() -> None:
    tokenizer = ByteTokenizer()
    text = "naïve ∑ text"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < 256


def test_errors_name_the_problem() -> None:
    model = _model("tiny-mamba1", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"ids in \[0, 101\).*tokenizer"):
        streaming_nll(model, torch.tensor([1, 2, 300]))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        streaming_nll(model, torch.tensor([1]))
    with pytest.raises(TypeError, match="integer dtype"):
        sliding_nll(model, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(num_tokens,\)"):
        streaming_nll(model, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="stride must be in"):
        sliding_nll(model, torch.tensor([1, 2, 3]), context=4, stride=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate_perplexity(model, torch.tensor([1, 2, 3]), mode="windowed")


def test_load_tokens_tail_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij")
    ids = load_tokens(str(path), ByteTokenizer(), tail=0.3)
    assert bytes(ids.tolist()) == b"hij"
    assert bytes(load_tokens(str(path), ByteTokenizer(), max_tokens=4).tolist()) == b"abcd"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens(str(tmp_path / "missing.txt"), ByteTokenizer())


def test_perplexity_command_on_a_trained_run(tmp_path: Path) -> None:
    """Train a tiny model for two steps with the trainer, then score the text through the run folder:
    the run's checkpoint and character tokenizer are found and used."""
    from ssmkit.cli import main
    from ssmkit.training import Trainer, load_config

    text = tmp_path / "text.txt"
    text.write_text(("to be or not to be, that is the question. " * 40).strip())
    run = tmp_path / "run"
    config = load_config(
        None,
        [
            "model.preset=tiny-mamba1",
            f"data.path={text}",
            "data.seq_len=32",
            "data.micro_batch_size=2",
            "data.val_fraction=0.1",
            "max_steps=2",
            f"out_dir={run}",
            "device=cpu",
            "progress=false",
            "tensorboard=false",
            "plots=false",
            "schedule.warmup_steps=1",
        ],
    )
    Trainer(config).fit()
    loaded = load_model(run)
    assert loaded.kind == "checkpoint" and loaded.tokenizer_folder == run / "tokenizer"
    assert loaded.train_seq_len == 32

    out = tmp_path / "ppl.json"
    options = ["--mode", "sliding", "--context", "64", "--stride", "32", "--tail", "0.5", "--json", str(out)]
    code = main(["eval", "perplexity", str(run), str(text), *options, "--device", "cpu"])
    assert code == 0
    result = json.loads(out.read_text())
    n = len(text.read_text())
    assert result["mode"] == "sliding" and result["tokens"] == n - int(n * 0.5) - 1
    assert result["bits_per_char"] == pytest.approx(result["bits_per_token"])
    # A preset has no tokenizer: bytes by default, which overflow tiny-mamba1's vocabulary of 101.
    with pytest.raises(ValueError, match="tokenizer"):
        main(["eval", "perplexity", "tiny-mamba1", str(text), "--device", "cpu"])
    assert (
        main(["eval", "perplexity", "tiny-mamba1", str(text), "--tokenizer", "char", "--device", "cpu"]) == 0
    )


def test_load_model_resolves_presets_and_hugging_face_folders(tmp_path: Path) -> None:
    preset = load_model("tiny-mamba2", seed=3)
    again = load_model("tiny-mamba2", seed=3)
    assert preset.kind == "preset" and not preset.model.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(preset.model.state_dict().values(), again.model.state_dict().values())
    )
    preset.model.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.kind == "hf"
    ids = _tokens(20)[None]
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, preset.model(ids).logits, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(tmp_path / "empty")
