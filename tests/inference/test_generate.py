"""generate / stream: greedy equals the argmax of the full forward pass, batches of different
lengths give each prompt its own tokens, stop tokens, seeds, streaming, the decode runner's
buckets and its fallback when a CUDA graph cannot be captured."""

from __future__ import annotations

import logging

import pytest
import torch

from ssmkit.inference import DecodeRunner, as_prompts, bucket_for, generate, graphs, stream
from tests.inference.common import HYBRID_ROPE, tiny_model

PATTERNS = ["tiny-mamba1", "tiny-mamba2", "tiny-hybrid", HYBRID_ROPE, "tiny-s4", "tiny-grounded"]


def _greedy_by_full_forward(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The slow, obviously right way: the whole sequence through the model at every step."""
    seq = prompt[None].to(model.embedding.weight.device)
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[0, prompt.numel() :].tolist()


def _prompts(vocab: int, lengths=(9, 3, 17, 9)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("name", PATTERNS)
def test_batch_of_different_lengths_gives_each_prompt_its_own_tokens(name, device):
    model = tiny_model(name, device)
    prompts = _prompts(model.config.vocab_size)
    batched = generate(model, prompts, max_new_tokens=8)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=8).sequences[0]
        assert batched.sequences[i] == alone, f"{name}: prompt {i} (length {prompt.numel()})"
    # and greedy decoding is the argmax of the full forward pass (checked on the longest prompt)
    assert batched.sequences[2] == _greedy_by_full_forward(model, prompts[2], 8)
    assert batched.finish_reasons == ["length"] * 4
    assert batched.prompt_lengths == [9, 3, 17, 9]


def test_padding_would_change_the_tokens(device):
    """The test above can fail: a left-padded prompt (pad token 0 in front) is a different prompt
    for an SSM, and generates different tokens. Our batching never pads."""
    model = tiny_model("tiny-mamba2", device)
    prompt = _prompts(model.config.vocab_size)[1]
    padded = torch.cat([torch.zeros(6, dtype=torch.long), prompt])
    assert (
        generate(model, [padded], max_new_tokens=8).sequences
        != generate(model, [prompt], max_new_tokens=8).sequences
    )


def test_chunked_prefill_gives_the_same_tokens(device):
    model = tiny_model("tiny-hybrid", device)
    prompts = _prompts(model.config.vocab_size)
    one = generate(model, prompts, max_new_tokens=6, prefill_chunk_size=64)
    chunked = generate(model, prompts, max_new_tokens=6, prefill_chunk_size=4)
    assert one.sequences == chunked.sequences


def test_stop_tokens_end_rows_and_stream_matches_generate(device):
    model = tiny_model("tiny-mamba2", device)
    prompts = _prompts(model.config.vocab_size)
    free = generate(model, prompts, max_new_tokens=10)
    stop = free.sequences[0][3]  # row 0 stops at its 4th token (or earlier if it appears before)
    out = generate(model, prompts, max_new_tokens=10, stop_token_ids=[stop], check_every=2)
    for row, seq in enumerate(free.sequences):
        expected = seq[: seq.index(stop) + 1] if stop in seq else seq
        assert out.sequences[row] == expected
        assert out.finish_reasons[row] == ("stop" if stop in seq else "length")
    steps = list(stream(model, prompts, max_new_tokens=10, stop_token_ids=stop))
    columns = [[step[row] for step in steps if step[row] is not None] for row in range(len(prompts))]
    assert columns == out.sequences
    # once a row has finished it yields None
    first_stop = out.sequences[0].index(stop)
    assert all(step[0] is None for step in steps[first_stop + 1 :])


def test_all_rows_stopping_ends_the_loop_early(device):
    model = tiny_model("tiny-mamba1", device)
    prompt = _prompts(model.config.vocab_size)[0]
    first = generate(model, [prompt], max_new_tokens=1).sequences[0][0]
    out = generate(model, [prompt], max_new_tokens=50, stop_token_ids=[first], check_every=1)
    assert out.sequences == [[first]] and out.finish_reasons == ["stop"]
    assert out.decode_steps == 0
    assert len(list(stream(model, [prompt], max_new_tokens=50, stop_token_ids=[first]))) == 1


def test_sampling_is_reproducible_with_a_seed(device):
    model = tiny_model("tiny-hybrid", device)
    prompts = _prompts(model.config.vocab_size)
    kwargs = dict(
        max_new_tokens=12, temperature=1.5, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.1
    )
    a = generate(model, prompts, seed=11, **kwargs).sequences
    b = generate(model, prompts, seed=11, **kwargs).sequences
    c = generate(model, prompts, seed=12, **kwargs).sequences
    assert a == b and a != c
    torch.manual_seed(3)
    d = generate(model, prompts, **kwargs).sequences
    torch.manual_seed(3)
    assert generate(model, prompts, **kwargs).sequences == d
    streamed = [step for step in stream(model, prompts, seed=11, **kwargs)]
    assert [[s[r] for s in streamed] for r in range(len(prompts))] == a


def test_repetition_penalty_changes_greedy_output(device):
    model = tiny_model("micro-mamba2", device)
    plain = generate(model, [1, 2, 3], max_new_tokens=20).sequences[0]
    penalised = generate(model, [1, 2, 3], max_new_tokens=20, repetition_penalty=5.0).sequences[0]
    assert plain != penalised
    assert len(set(penalised)) > len(set(plain))


def test_model_methods_and_prompt_forms(device):
    model = tiny_model("tiny-mamba2", device)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model.generate(ids, max_new_tokens=4)
    assert out.padded().shape == (2, 4)
    assert model.generate([[5, 6, 7, 8], [9, 10, 11, 12]], max_new_tokens=4).sequences == out.sequences
    assert model.generate(ids[0], max_new_tokens=4).sequences == out.sequences[:1]
    assert model.generate([5, 6, 7, 8], max_new_tokens=4).sequences == out.sequences[:1]
    assert [s[0] for s in model.stream(ids[:1], max_new_tokens=4)] == out.sequences[0]
    assert out.num_generated == 8 and out.decode_steps == 3
    assert out.prefill_seconds > 0 and out.decode_seconds > 0


def test_bf16_generation_runs_in_the_model_dtype(device):
    model = tiny_model("tiny-hybrid", device, dtype=torch.bfloat16)
    out = generate(model, _prompts(model.config.vocab_size), max_new_tokens=5)
    assert all(len(s) == 5 for s in out.sequences)
    assert all(0 <= t < model.config.vocab_size for s in out.sequences for t in s)


def test_bad_prompts_and_arguments_are_named(device):
    model = tiny_model("tiny-mamba2", device)
    with pytest.raises(
        ValueError, match=r"prompt 1 must be a non-empty 1-D sequence of token ids, got shape \(0,\)"
    ):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"prompt 0 must hold token ids in 0\.\.103, got ids from 1 to 500"):
        generate(model, [[1, 500]])
    with pytest.raises(TypeError, match="input_ids must have an integer dtype"):
        generate(model, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seqlen\) or \(seqlen,\)"):
        generate(model, torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        generate(model, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, [1, 2], temperature=1.0, top_p=2.0)
    with pytest.raises(ValueError, match="prompts must hold at least one prompt"):
        as_prompts([])


def test_bucket_for():
    assert [bucket_for(b) for b in (1, 2, 3, 5, 16, 17, 64, 65, 256)] == [1, 2, 4, 8, 16, 24, 64, 96, 256]
    assert bucket_for(300) == 300
    assert bucket_for(3, (2, 8)) == 8
    with pytest.raises(ValueError, match="batch must be at least 1, got 0"):
        bucket_for(0)


def test_cuda_graph_needs_cuda():
    model = tiny_model("tiny-mamba2", torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, it is on cpu"):
        DecodeRunner(model, cuda_graph=True)
    assert not DecodeRunner(model).use_graphs


def _graphs_on_cpu(monkeypatch, model, capture):
    """A runner that takes the graph branch on the CPU, with ``capture`` standing in for the real
    CUDA capture (which needs a GPU)."""
    runner = DecodeRunner(model, cuda_graph=False)
    runner.use_graphs = True
    monkeypatch.setattr(DecodeRunner, "_capture", capture)
    return runner


def test_graph_path_buckets_and_static_buffers(monkeypatch, device):
    """The graph-mode plumbing (bucketed cache, static token and logit buffers, replay) with a
    "graph" whose replay runs the captured step function eagerly: same tokens as plain eager."""
    model = tiny_model(HYBRID_ROPE, device)
    captured = []

    def fake_capture(self, entry):
        captured.append(entry.tokens.shape[0])
        return lambda: self._run_static(entry)

    runner = _graphs_on_cpu(monkeypatch, model, fake_capture)
    prompts = _prompts(model.config.vocab_size)
    expected = generate(model, prompts, max_new_tokens=7, cuda_graph=False).sequences
    out = generate(model, prompts, max_new_tokens=7, runner=runner)
    assert out.sequences == expected and out.cuda_graph
    assert captured == [4] and runner.cache.batch == 4
    # 3 prompts use the same bucket of 4 rows (one garbage row), without a new capture
    assert generate(model, prompts[:3], max_new_tokens=7, runner=runner).sequences == expected[:3]
    assert captured == [4]
    # 5 prompts: bucket 8, captured once
    five = prompts + prompts[:1]
    assert generate(model, five, max_new_tokens=7, runner=runner).sequences == expected + expected[:1]
    assert captured == [4, 8] and runner.cache.batch == 8
    # a longer request than the bucket's KV room: rebuilt with more room
    generate(model, prompts, max_new_tokens=40, runner=runner)
    assert captured == [4, 8, 4] and runner.cache.max_length >= 17 + 40


def test_capture_failure_falls_back_to_eager(monkeypatch, device, caplog):
    model = tiny_model("tiny-mamba2", device)

    def failing_capture(self, entry):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = _graphs_on_cpu(monkeypatch, model, failing_capture)
    prompts = _prompts(model.config.vocab_size)
    expected = generate(model, prompts, max_new_tokens=6, cuda_graph=False).sequences
    with caplog.at_level(logging.WARNING, logger=graphs.__name__):
        out = generate(model, prompts, max_new_tokens=6, runner=runner)
    assert out.sequences == expected and not out.cuda_graph
    assert "CUDA graph capture failed for batch bucket 4" in caplog.text
    assert "not permitted when stream is capturing" in runner.fallback_reason
    assert not runner.use_graphs  # later calls do not retry


def test_runner_notices_a_converted_model(device):
    model = tiny_model("tiny-mamba2", device)
    runner = DecodeRunner(model)
    first = runner.prepare(2, 10)
    model.double()
    second = runner.prepare(2, 10)
    assert second is not first and second.states[0].conv.dtype == torch.float64
