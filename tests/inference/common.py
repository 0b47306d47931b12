"""Tiny models for the generation tests: presets with every parameter moved off its init."""

from __future__ import annotations

import torch

from ssmkit.models import LanguageModel, ModelConfig, get_preset
from ssmkit.models.config import Mamba2Config

# Rotary embeddings on: the preallocated KV cache must place them at each row's own positions.
HYBRID_ROPE = "tiny-hybrid-rope"


def config_for(name: str) -> ModelConfig:
    if name == HYBRID_ROPE:
        config = get_preset("tiny-hybrid")
        config.attention.rotary_dim = None  # head_dim: full rotary
        return config
    if name == "micro-mamba2":
        # One small layer: thousands of decode steps in seconds on a CPU.
        return ModelConfig(
            d_model=16,
            n_layer=1,
            vocab_size=29,
            default_layer="mamba2",
            mamba2=Mamba2Config(d_state=4, headdim=8, chunk_size=8),
        )
    return get_preset(name)


def tiny_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(config_for(name)).to(device=device, dtype=dtype).eval()
    # Norm weights of exactly 1, D = 1, zero biases ... would hide mix-ups between rows or positions.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype))
    return model
