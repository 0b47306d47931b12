"""bf16 autocast (what the trainer uses) works through the full and the cache paths of every SSM
pattern, and the operators keep their own fp32 precision inside it."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import LanguageModel, get_preset


@pytest.mark.parametrize("preset", ["tiny-mamba1", "tiny-mamba2", "tiny-hybrid"])
def test_bf16_autocast_full_and_cached_forward(preset: str) -> None:
    model = LanguageModel(get_preset(preset))
    ids = torch.randint(0, 101, (2, 30))
    cache = model.allocate_cache(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids, labels=ids)
        cached = model(ids, labels=ids, cache=cache)
    (full.loss + cached.loss).backward()
    assert torch.isfinite(full.loss) and torch.isfinite(cached.loss)
    torch.testing.assert_close(full.loss, cached.loss, rtol=1e-3, atol=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_input_is_a_clear_error() -> None:
    model = LanguageModel(get_preset("tiny-mamba2"))
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
