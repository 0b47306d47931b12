"""The inference cache: decode with the cache == the full forward pass; chunked prefill == one pass;
fixed SSM memory; row operations (select, reorder, copy rows), reset and copy."""

from __future__ import annotations

import pytest
import torch

from ssmkit.inference import DecodeRunner, prefill, stream
from ssmkit.layers.attention import StaticKVState
from ssmkit.layers.state import KVState, SSMState
from ssmkit.models import InferenceCache
from tests.helpers import rel_err
from tests.inference.common import HYBRID_ROPE, tiny_model

PATTERNS = ["tiny-mamba1", "tiny-mamba2", "tiny-hybrid", HYBRID_ROPE, "tiny-s4", "tiny-grounded"]
TOL = 1e-4  # the bound for fp32 decode vs full forward


def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the largest logit."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("name", PATTERNS)
def test_token_by_token_decode_matches_full_forward(name, device):
    """A 5-token prompt, then 14 tokens one at a time through the step kernels, on a preallocated
    cache (the generation path) and on a growing one: every position's logits equal the full pass."""
    model = tiny_model(name, device)
    ids = torch.randint(0, model.config.vocab_size, (3, 19), device=device)
    with torch.no_grad():
        full = model(ids).logits
        for max_length in (24, None):
            cache = InferenceCache.allocate(model, 3, max_length=max_length)
            steps = [model(ids[:, :5], cache=cache).logits]
            steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 19)]
            got = torch.cat(steps, dim=1)
            assert _max_rel(got, full) < TOL, f"{name} max_length={max_length}: {_max_rel(got, full):.2e}"
            assert rel_err(got, full) < TOL


@pytest.mark.parametrize("name", ["tiny-mamba1", "tiny-mamba2", HYBRID_ROPE])
def test_runner_decode_after_separate_prefills_matches_full_forward(name, device):
    """Rows prefilled apart with different lengths (7 and 4 tokens), copied into one preallocated
    cache and decoded together by the DecodeRunner: each row's logits equal its own full pass."""
    model = tiny_model(name, device)
    vocab = model.config.vocab_size
    seqs = [torch.randint(0, vocab, (1, n), device=device) for n in (13, 10)]
    prompt_lengths = (7, 4)
    runner = DecodeRunner(model, cuda_graph=None)
    with torch.no_grad():
        cache = runner.prepare(2, 16)
        for row, (seq, length) in enumerate(zip(seqs, prompt_lengths)):
            part = InferenceCache.allocate(model, 1)
            prefill(model, part, seq[:, :length], chunk_size=3)
            cache.copy_rows_([row], part)
        decoded = [[], []]
        for step in range(6):
            tokens = torch.stack([seq[0, length + step] for seq, length in zip(seqs, prompt_lengths)])
            logits = runner.step(tokens).clone()
            for row in range(2):
                decoded[row].append(logits[row])
        for row, (seq, length) in enumerate(zip(seqs, prompt_lengths)):
            full = model(seq).logits[0, length : length + 6]
            got = torch.stack(decoded[row])
            assert _max_rel(got, full) < TOL, f"{name} row {row}: {_max_rel(got, full):.2e}"


@pytest.mark.parametrize("name", ["tiny-mamba1", "tiny-mamba2", "tiny-hybrid", "tiny-s4"])
def test_chunked_prefill_equals_one_pass(name, device):
    """A 37-token prompt in chunks of 5 (not a multiple of the kernels' chunk size 8) leaves the same
    conv, SSM and KV states and the same last logits as one pass."""
    model = tiny_model(name, device)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), device=device)
    one, chunked = InferenceCache.allocate(model, 2), InferenceCache.allocate(model, 2)
    last_one = prefill(model, one, ids, chunk_size=37)
    last_chunked = prefill(model, chunked, ids, chunk_size=5)
    assert _max_rel(last_chunked, last_one) < TOL
    assert chunked.seqlen_offset == one.seqlen_offset == 37
    for layer, (a, b) in enumerate(zip(chunked.tensors(), one.tensors())):
        assert a.shape == b.shape
        assert rel_err(a, b) < TOL, f"{name} tensor {layer}: {rel_err(a, b):.2e}"


def test_ssm_cache_memory_is_the_same_after_10_and_10000_tokens(device):
    """One generation of 10,000 tokens, watched step by step: the cache's bytes and tensors after
    10 tokens are those after 10,000 (nothing grows, nothing is reallocated)."""
    model = tiny_model("micro-mamba2", device)
    runner = DecodeRunner(model)
    seen = {}
    steps = stream(model, [3, 1, 4, 1, 5], max_new_tokens=10_000, temperature=1.0, seed=0, runner=runner)
    for count, tokens in enumerate(steps, start=1):
        assert tokens[0] is not None
        if count in (10, 10_000):
            cache = runner.cache
            assert cache.seqlen_offset == 5 + count - 1
            memory = cache.memory()
            assert memory.kv == 0 and memory.recurrent > 0
            assert all(torch.isfinite(t).all() for t in cache.tensors())
            seen[count] = (memory.total, [t.data_ptr() for t in cache.tensors()])
    assert count == 10_000
    assert seen[10][0] == seen[10_000][0]
    assert seen[10][1] == seen[10_000][1], "the decode loop reallocated a state tensor"


def test_hybrid_memory_report_separates_fixed_and_kv(device):
    model = tiny_model("tiny-hybrid", device)
    static = InferenceCache.allocate(model, 2, max_length=50)
    growing = InferenceCache.allocate(model, 2)
    attention = model.layers[1].mixer
    kv_bytes = 2 * 2 * attention.num_kv_heads * 50 * attention.head_dim * 4 + 2 * 8  # + lengths
    assert static.memory().kv == kv_bytes
    assert growing.memory().kv == 0
    assert static.memory().recurrent == growing.memory().recurrent > 0
    assert static.nbytes() == static.memory().total
    with torch.no_grad():
        model(torch.zeros(2, 9, dtype=torch.long, device=device), cache=growing)
    assert growing.memory().kv == 2 * 2 * attention.num_kv_heads * 9 * attention.head_dim * 4
    assert static.memory().kv == kv_bytes  # preallocated: the same whatever the length


def _filled_cache(model, device, batch=3, max_length=12):
    cache = InferenceCache.allocate(model, batch, max_length=max_length)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (batch, 6), device=device), cache=cache)
    return cache


def test_select_reorder_copy_and_reset(device):
    model = tiny_model("tiny-hybrid", device)
    cache = _filled_cache(model, device)
    assert isinstance(cache.states[0], SSMState) and isinstance(cache.states[1], StaticKVState)
    snapshot = cache.copy()
    assert all(a is not b and torch.equal(a, b) for a, b in zip(snapshot.tensors(), cache.tensors()))

    picked = cache.select([2, 0])
    assert picked.batch == 2
    for small, big in zip(picked.tensors(), cache.tensors()):
        assert torch.equal(small, big[[2, 0]])

    pointers = [t.data_ptr() for t in cache.tensors()]
    cache.reorder_([1, 2, 0])
    assert [t.data_ptr() for t in cache.tensors()] == pointers  # in place: CUDA-graph safe
    for now, before in zip(cache.tensors(), snapshot.tensors()):
        assert torch.equal(now, before[[1, 2, 0]])

    target = InferenceCache.allocate(model, 4, max_length=12)
    target.copy_rows_([3, 1], picked)
    for mine, theirs in zip(target.tensors(), picked.tensors()):
        assert torch.equal(mine[[3, 1]], theirs)
    assert target.seqlen_offset == 6

    cache.reset()
    assert cache.seqlen_offset == 0
    assert all(t.abs().sum() == 0 for s in cache.states if isinstance(s, SSMState) for t in (s.conv, s.ssm))
    assert cache.states[1].lengths.tolist() == [0, 0, 0]
    assert [t.data_ptr() for t in cache.tensors()] == pointers
    # The copy taken before is untouched by all of this.
    assert snapshot.states[1].lengths.tolist() == [6, 6, 6]


def test_continuing_from_a_selected_row_matches(device):
    """Dropping rows mid-generation: the selected cache continues exactly like the full one."""
    model = tiny_model("tiny-hybrid", device)
    cache = _filled_cache(model, device)
    small = cache.select([1])
    token = torch.tensor([[7], [8], [9]], device=device)
    with torch.no_grad():
        full = model(token, cache=cache).logits
        alone = model(token[1:2], cache=small).logits
    assert _max_rel(alone, full[1:2]) < TOL


def test_row_operations_reject_bad_rows(device):
    model = tiny_model("tiny-hybrid", device)
    cache = InferenceCache.allocate(model, 2, max_length=4)
    with pytest.raises(ValueError, match=r"indices must hold row numbers in 0\.\.1, got \[0, 2\]"):
        cache.select([0, 2])
    with pytest.raises(ValueError, match=r"indices must have shape \(batch,\) = \(2,\), got \(3,\)"):
        cache.reorder_([0, 1, 1])
    longer = InferenceCache.allocate(model, 1)
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long, device=device), cache=longer)
    with pytest.raises(
        ValueError, match=r"layer 1: source holds 5 positions, more than this cache's max_length \(4\)"
    ):
        cache.copy_rows_([0], longer)
    with pytest.raises(ValueError, match=r"rows must have shape \(source.batch,\) = \(1,\), got \(2,\)"):
        cache.copy_rows_([0, 1], longer)
    growing = InferenceCache.allocate(model, 2)
    with pytest.raises(ValueError, match="a growing KV cache holds one length for all rows"):
        growing.copy_rows_([0], longer)
    with pytest.raises(ValueError, match="batch must be at least 1, got 0"):
        InferenceCache.allocate(model, 0)
    assert isinstance(growing.states[1], KVState)


def test_static_kv_cache_refuses_to_overflow():
    model = tiny_model("tiny-hybrid", torch.device("cpu"))
    cache = InferenceCache.allocate(model, 1, max_length=4)
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
