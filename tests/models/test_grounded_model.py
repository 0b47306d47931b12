"""The ``grounded`` layer type inside LanguageModel: config round trip, training step, cached decode."""

from __future__ import annotations

import torch

from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.presets import parameter_count


def test_config_round_trip_keeps_grounded_settings() -> None:
    config = get_preset("tiny-grounded")
    again = ModelConfig.from_dict(config.to_dict())
    assert again.grounded == config.grounded
    assert again.layer_types == ["grounded", "grounded"]


def test_forward_backward_and_cached_decode_match() -> None:
    model = LanguageModel(get_preset("tiny-grounded"))
    ids = torch.randint(0, 101, (2, 21))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        pieces = [model(ids[:, :13], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(13, 21)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_minimal_preset_shape() -> None:
    config = get_preset("grounded-minimal")
    assert (config.d_model, config.n_layer, config.grounded.d_state, config.grounded.num_heads) == (
        512,
        8,
        16,
        4,
    )
    assert 20e6 < parameter_count(config) < 60e6
