"""Sampling filters against hand-computed cases and transformers' logits processors; the exponential
race draws with the right frequencies; seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from ssmkit.inference import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

INF = float("-inf")


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [2.0, 2.0, 2.0, 1.0]])
    got = top_k_filter(logits, 2)
    assert got.tolist() == [[INF, 3.0, 2.0, INF], [2.0, 2.0, 2.0, INF]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [[False, False, False, True]]
    # the most likely token always stays
    assert torch.isinf(top_p_filter(logits, 0.1)).tolist() == [[False, True, True, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    got = min_p_filter(probs.log(), 0.35)  # threshold 0.175
    assert torch.isinf(got).tolist() == [[False, False, True, True]]
    assert torch.equal(min_p_filter(probs.log(), 0.0), probs.log())


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


@pytest.mark.parametrize("vocab", [37, 101])
def test_filters_match_transformers(vocab):
    pytest.importorskip("transformers", reason="transformers is the reference for the filters")
    from transformers.generation import logits_process as lp

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, vocab, generator=gen) * 3
    history = torch.randint(0, vocab, (4, 9), generator=gen)
    seen = torch.zeros(4, vocab, dtype=torch.bool).scatter_(1, history, True)
    cases = [
        (lambda x: top_k_filter(x, 5), lp.TopKLogitsWarper(5)),
        (lambda x: top_p_filter(x, 0.7), lp.TopPLogitsWarper(0.7)),
        (lambda x: min_p_filter(x, 0.1), lp.MinPLogitsWarper(0.1)),
        (lambda x: apply_repetition_penalty(x, seen, 1.3), lp.RepetitionPenaltyLogitsProcessor(1.3)),
    ]
    for ours, theirs in cases:
        expected = theirs(history, logits.clone())
        got = ours(logits.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), type(theirs).__name__
        finite = ~torch.isinf(expected)
        torch.testing.assert_close(got[finite], expected[finite])
    # the whole chain in transformers' order
    params = SamplingParams(temperature=0.7, top_k=9, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    chain = [
        lp.RepetitionPenaltyLogitsProcessor(1.2),
        lp.TemperatureLogitsWarper(0.7),
        lp.TopKLogitsWarper(9),
        lp.TopPLogitsWarper(0.8),
        lp.MinPLogitsWarper(0.05),
    ]
    expected = logits.clone()
    for processor in chain:
        expected = processor(history, expected)
    got = filter_logits(logits, params, seen)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_greedy_is_argmax_and_needs_no_generator():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 1.0]])
    assert sample_next(logits, SamplingParams(temperature=0.0)).tolist() == [1, 0]
    # a repetition penalty can move the greedy choice
    seen = torch.tensor([[False, True, False], [True, False, False]])
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    assert sample_next(logits, params, seen=seen).tolist() == [2, 2]


def test_sampling_follows_the_probabilities():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log()[None].expand(20_000, -1)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingParams(temperature=1.0), generator=gen)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    # 4 standard deviations of a binomial frequency at n = 20,000 is at most 0.0142
    assert (freq - probs.double()).abs().max() < 0.0142, freq.tolist()
    # filtered tokens are never drawn
    draws = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), generator=gen)
    assert set(draws.tolist()) <= {0, 1}


def test_seed_reproduces_and_differs():
    logits = torch.randn(8, 50)
    params = SamplingParams(temperature=1.3, top_p=0.95)
    draw = lambda seed: sample_next(logits, params, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, r"temperature must be >= 0 \(0: greedy\), got -0\.5"),
        ({"top_k": -1}, r"top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0\.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\], got 2\.0"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate()


def test_repetition_penalty_without_history_is_an_error():
    with pytest.raises(ValueError, match="a repetition_penalty needs seen"):
        filter_logits(torch.zeros(1, 3), SamplingParams(repetition_penalty=1.5))
