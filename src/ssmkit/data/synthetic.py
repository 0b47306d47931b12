"""Synthetic tasks of the Mamba paper and Zoology, as seeded generators of (input_ids, labels).

Every task draws a batch from a ``torch.Generator`` seeded by (seed, batch index), so a batch is
the same whenever it is asked for (resumable, identical across processes). ``labels`` follow the
next-token convention of :class:`ssmkit.models.LanguageModel` and Hugging Face: the loss compares
``logits[:, t]`` with ``labels[:, t + 1]``; positions that are not answers hold ``IGNORE`` (-100).
:func:`answer_accuracy` scores only the answer positions.

- :class:`SelectiveCopying` (Mamba paper, section 4.1, Table 1): ``num_tokens`` data tokens scattered
  among noise in a context of ``seqlen``; after a separator and ``num_tokens`` marker tokens the
  model must reproduce the data tokens in order. Needs content-aware (selective) memory: an LTI
  model cannot know where the data tokens are.
- :class:`InductionHeads` (Table 2): random tokens; a special token followed by a target token
  occurs once; the sequence ends with the special token again and the model must recall the target.
  Trained at one length, tested far beyond it.
- :class:`AssociativeRecall` (multi-query associative recall, Zoology): key-value pairs, then the
  keys reappear in random order at random positions; the model must answer each with its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


def _generator(seed: int, index: int) -> torch.Generator:
    # Distinct, reproducible streams per batch index: a resumed run regenerates the same batches.
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


@dataclass(frozen=True)
class SelectiveCopying:
    """Vocabulary: 0 = noise, 1 = separator, 2 = marker, data tokens 3 .. 3 + vocab_data - 1.

    input_ids: (batch, seqlen + 1 + num_tokens)  context, separator, markers
    labels:    same shape; labels[:, seqlen + 1 + i] = i-th data token (predicted from the separator
               or the previous marker), IGNORE elsewhere.
    """

    seqlen: int = 4096
    num_tokens: int = 16
    vocab_data: int = 16
    seed: int = 0

    NOISE, SEPARATOR, MARKER, FIRST_DATA = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return self.FIRST_DATA + self.vocab_data

    @property
    def length(self) -> int:
        return self.seqlen + 1 + self.num_tokens

    def batch(self, batch_size: int, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_tokens > self.seqlen:
            raise ValueError(f"num_tokens ({self.num_tokens}) must be <= seqlen ({self.seqlen})")
        gen = _generator(self.seed, index)
        data = torch.randint(self.FIRST_DATA, self.vocab_size, (batch_size, self.num_tokens), generator=gen)
        # Random distinct positions, kept in increasing order so the data order is the reading order.
        positions = torch.rand(batch_size, self.seqlen, generator=gen).argsort(dim=1)[:, : self.num_tokens]
        positions = positions.sort(dim=1).values
        inputs = torch.full((batch_size, self.length), self.NOISE, dtype=torch.long)
        inputs.scatter_(1, positions, data)
        inputs[:, self.seqlen] = self.SEPARATOR
        inputs[:, self.seqlen + 1 :] = self.MARKER
        labels = torch.full_like(inputs, IGNORE)
        labels[:, self.seqlen + 1 :] = data
        return inputs, labels


@dataclass(frozen=True)
class InductionHeads:
    """Vocabulary: 0 = the special (trigger) token, 1 .. vocab - 1 ordinary tokens.

    input_ids: (batch, seqlen + 1)  random tokens with one ``trigger, target`` pair in the first half,
               the trigger again at position seqlen - 1, and the target appended as the last token
               (so that the next-token loss at the final trigger is the recall).
    labels:    IGNORE except the last position, which holds the target.
    """

    seqlen: int = 256
    vocab_size: int = 16
    seed: int = 0

    TRIGGER = 0

    def batch(self, batch_size: int, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seqlen < 4:
            raise ValueError(f"seqlen must be >= 4, got {self.seqlen}")
        gen = _generator(self.seed, index)
        # seqlen tokens of context (the last one is the trigger) plus the answer token, so that the
        # next-token loss at the final trigger is the recall.
        inputs = torch.randint(1, self.vocab_size, (batch_size, self.seqlen + 1), generator=gen)
        target = torch.randint(1, self.vocab_size, (batch_size,), generator=gen)
        first = torch.randint(0, self.seqlen // 2, (batch_size,), generator=gen)
        rows = torch.arange(batch_size)
        inputs[rows, first] = self.TRIGGER
        inputs[rows, first + 1] = target
        inputs[:, self.seqlen - 1] = self.TRIGGER
        inputs[:, self.seqlen] = target
        labels = torch.full_like(inputs, IGNORE)
        labels[:, self.seqlen] = target
        return inputs, labels


@dataclass(frozen=True)
class AssociativeRecall:
    """Multi-query associative recall. Keys are drawn from [1, vocab/2), values from [vocab/2, vocab),
    0 fills the gaps between queries.

    input_ids: (batch, seqlen)  k1 v1 ... kK vK, then the K keys again at random positions, each
               followed by its value (the model's answer slot, scored through labels).
    labels:    the value at each answer slot, IGNORE elsewhere.
    """

    seqlen: int = 256
    num_pairs: int = 16
    vocab_size: int = 8192
    seed: int = 0

    def batch(self, batch_size: int, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pairs, length = self.num_pairs, self.seqlen
        if 4 * pairs > length:
            raise ValueError(f"seqlen ({length}) must be >= 4 * num_pairs ({4 * pairs})")
        if self.vocab_size // 2 - 1 < pairs:
            raise ValueError(f"vocab_size ({self.vocab_size}) too small for {pairs} distinct keys")
        gen = _generator(self.seed, index)
        half = self.vocab_size // 2
        keys = torch.rand(batch_size, half - 1, generator=gen).argsort(dim=1)[:, :pairs] + 1  # distinct keys
        values = torch.randint(half, self.vocab_size, (batch_size, pairs), generator=gen)
        inputs = torch.zeros(batch_size, length, dtype=torch.long)
        inputs[:, 0 : 2 * pairs : 2], inputs[:, 1 : 2 * pairs : 2] = keys, values
        # Query slots: pairs of positions (key, answer) in the remaining space, no overlaps.
        slots = (length - 2 * pairs) // 2
        chosen = torch.rand(batch_size, slots, generator=gen).argsort(dim=1)[:, :pairs]
        key_pos = 2 * pairs + 2 * chosen
        order = torch.rand(batch_size, pairs, generator=gen).argsort(dim=1)  # queries in random key order
        query_keys, query_values = keys.gather(1, order), values.gather(1, order)
        inputs.scatter_(1, key_pos, query_keys)
        inputs.scatter_(1, key_pos + 1, query_values)
        labels = torch.full_like(inputs, IGNORE)
        labels.scatter_(1, key_pos + 1, query_values)
        return inputs, labels


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of answer positions predicted exactly (next-token convention).

    logits: (batch, seqlen, vocab)   labels: (batch, seqlen) with IGNORE outside the answers.
    """
    predicted = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    scored = targets != IGNORE
    if not bool(scored.any()):
        raise ValueError("labels contain no answer positions")
    return (predicted[scored] == targets[scored]).float().mean().item()
