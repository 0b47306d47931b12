"""LanguageModel training-time behaviour: dropout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ssmkit.models import LanguageModel, get_preset


def test_dropout_acts_in_training_only():
    """dropout > 0: two training forwards differ (embedding and branch dropout), eval mode equals the
    same weights without dropout exactly, and a bad rate is refused naming the field."""
    config = get_preset("tiny-mamba2")
    torch.manual_seed(0)
    plain = LanguageModel(config)
    dropped = LanguageModel(dataclasses.replace(config, dropout=0.2))
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 12))
    dropped.train()
    a, b = dropped(ids).logits, dropped(ids).logits
    assert not torch.allclose(a, b)
    dropped.eval()
    plain.eval()
    assert torch.equal(dropped(ids).logits, plain(ids).logits)
    with pytest.raises(ValueError, match="dropout"):
        dataclasses.replace(config, dropout=1.0)
