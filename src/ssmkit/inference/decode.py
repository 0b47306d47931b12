"""One decode step of a :class:`~ssmkit.models.LanguageModel` with the blocks in pre-norm form.

``model(input_ids, cache=cache)`` finishes every block with its residual add, and the next block
starts by normalising the sum: two launches per layer that ``add_rms_norm`` does in one. At batch 1
a decode step is a chain of such tiny launches (a CUDA graph replays them back to back, each one
latency bound), so :func:`decode_step` walks the blocks through :meth:`Block.forward_prenorm`,
which hands each block's last branch output to the next block's fused add + norm, and the last
one to the final norm.

It is the decode path of ``LanguageModel.forward`` and nothing else (no labels, no packed
sequences, no tracing); ``tests/inference/test_decode.py`` checks that both give the same logits.
Any other model, or a call that is not one token on a non-empty cache, goes through
``model(...)`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.block import Block
from ssmkit.models.cache import InferenceCache


def prenorm_walk_applies(model: nn.Module) -> bool:
    """Whether :func:`decode_step` can walk ``model``'s blocks itself."""
    from ssmkit.models.language_model import LanguageModel

    return (
        isinstance(model, LanguageModel)
        and len(model.layers) > 0
        and all(isinstance(block, Block) for block in model.layers)
    )


def decode_step(model: nn.Module, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """input_ids: (batch, 1) int on a cache that has seen tokens -> logits (batch, vocab_size) of the
    next position; advances ``cache`` like ``model(input_ids, cache=cache)`` does."""
    if (
        not prenorm_walk_applies(model)
        or cache.seqlen_offset == 0
        or input_ids.dim() != 2
        or input_ids.shape[1] != 1
        or cache.batch != input_ids.shape[0]
    ):
        return model(input_ids, cache=cache).logits[:, -1]
    config = model.config
    hidden = model.embedding(input_ids)
    if config.embedding_multiplier != 1.0:
        hidden = hidden * config.embedding_multiplier
    branch, residual = None, hidden
    for block, state in zip(model.layers, cache.states):
        branch, residual = block.forward_prenorm(
            branch, residual, seq_idx=None, cu_seqlens=None, state=state, decode=True
        )
    # The last block's add, fused with the final norm (norm_f of the sum, in norm_f's dtype).
    hidden, _ = model.layers[-1].add_norm(model.norm_f, branch, residual)
    logits = F.linear(hidden[:, -1], model.head_weight())
    if config.logits_scaling != 1.0:
        logits = logits / config.logits_scaling
    cache.seqlen_offset += 1
    return logits[..., : config.vocab_size]
