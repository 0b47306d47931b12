"""Shared pieces of the training tests: small configs and token streams."""

from __future__ import annotations

import numpy as np

from ssmkit.data.tokens import TokenStream
from ssmkit.training.config import TrainConfig


def random_stream(
    num_tokens: int = 4096, vocab_size: int = 32, seed: int = 0, eos_id: int | None = None
) -> TokenStream:
    """Tokens with some structure (a noisy repeating pattern) so that a model can learn them."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab_size, size=17)
    tokens = np.resize(pattern, num_tokens)
    noise = rng.random(num_tokens) < 0.2
    tokens[noise] = rng.integers(0, vocab_size, size=int(noise.sum()))
    if eos_id is not None:
        tokens[rng.random(num_tokens) < 0.05] = eos_id
    return TokenStream(tokens.astype(np.int64), vocab_size, eos_id)


def small_config(out_dir, **overrides) -> TrainConfig:
    """A config for a few CPU steps of a tiny model; keys as ``section__field`` or ``field``."""
    config = TrainConfig()
    config.out_dir = str(out_dir)
    config.max_steps = 8
    config.progress = False
    config.tensorboard = False
    config.plots = False
    config.device = "cpu"
    config.data.kind = "random"
    config.data.seq_len = 16
    config.data.micro_batch_size = 2
    config.data.val_fraction = 0.0
    config.optim.lr = 1e-2
    config.schedule.warmup_steps = 2
    config.checkpoint.every = 0
    config.guard.snapshot_every = 2
    config.guard.spike_warmup = 3
    for key, value in overrides.items():
        if "__" in key:
            section, name = key.split("__")
            setattr(getattr(config, section), name, value)
        else:
            setattr(config, key, value)
    config.validate()
    return config
