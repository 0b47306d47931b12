"""The synthetic task generators: shapes, determinism, and that the labels really are the answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.data.synthetic import IGNORE, AssociativeRecall, InductionHeads, SelectiveCopying, answer_accuracy


def _perfect_logits(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits that predict every answer exactly (next-token convention)."""
    targets = labels[:, 1:].clamp(min=0)
    logits = F.one_hot(targets, vocab).float()
    return torch.cat([logits, torch.zeros(labels.shape[0], 1, vocab)], dim=1)


def test_selective_copying_answers_are_the_data_tokens_in_order() -> None:
    task = SelectiveCopying(seqlen=67, num_tokens=5, vocab_data=7, seed=3)
    inputs, labels = task.batch(4, index=2)
    assert inputs.shape == labels.shape == (4, 67 + 1 + 5)
    for row in range(4):
        context = inputs[row, :67]
        data = context[context >= task.FIRST_DATA]
        assert data.tolist() == labels[row, 68:].tolist()
        assert (labels[row, :68] == IGNORE).all()
    assert int(inputs.max()) < task.vocab_size


def test_batches_are_deterministic_and_distinct() -> None:
    task = SelectiveCopying(seqlen=50, num_tokens=4, seed=1)
    a, _ = task.batch(3, index=5)
    b, _ = task.batch(3, index=5)
    c, _ = task.batch(3, index=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_induction_heads_target_follows_first_trigger() -> None:
    task = InductionHeads(seqlen=40, vocab_size=16, seed=0)
    inputs, labels = task.batch(8)
    assert inputs.shape == (8, 41)
    for row in range(8):
        first = (inputs[row] == task.TRIGGER).nonzero()[0].item()
        assert inputs[row, first + 1] == labels[row, -1] == inputs[row, -1]
        assert inputs[row, 39] == task.TRIGGER


def test_associative_recall_values_match_keys() -> None:
    task = AssociativeRecall(seqlen=64, num_pairs=6, vocab_size=64, seed=0)
    inputs, labels = task.batch(5)
    for row in range(5):
        pairs = dict(zip(inputs[row, 0:12:2].tolist(), inputs[row, 1:12:2].tolist()))
        answers = (labels[row] != IGNORE).nonzero().flatten()
        assert len(answers) == 6
        for pos in answers.tolist():
            assert pairs[inputs[row, pos - 1].item()] == labels[row, pos].item()


@pytest.mark.parametrize(
    "task",
    [
        SelectiveCopying(seqlen=30, num_tokens=4),
        InductionHeads(seqlen=20),
        AssociativeRecall(seqlen=32, num_pairs=4, vocab_size=32),
    ],
)
def test_accuracy_of_perfect_and_wrong_predictions(task) -> None:
    inputs, labels = task.batch(4)
    logits = _perfect_logits(labels, task.vocab_size)
    assert answer_accuracy(logits, labels) == 1.0
    assert answer_accuracy(torch.zeros_like(logits), labels) < 1.0 or (labels[labels != IGNORE] == 0).all()


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        SelectiveCopying(seqlen=3, num_tokens=5).batch(1)
    with pytest.raises(ValueError, match="seqlen"):
        AssociativeRecall(seqlen=10, num_pairs=4).batch(1)
