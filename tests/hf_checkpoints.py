"""Small random Hugging Face checkpoints, written by `transformers` itself, for the tests that use
it as the reference (tests/models/test_hf.py, tests/inference/test_hf_generate.py,
tests/evaluation/test_compare.py).

Each builder returns a config of odd sizes (hidden 37, state 13, heads of 24, ...); a test file
picks its variant with keyword overrides. `transformers` is imported inside the functions: the
test files skip themselves with ``pytest.importorskip`` before calling anything here.
"""

from __future__ import annotations

from pathlib import Path

import torch


def mamba_config(**overrides):
    """Mamba-1: d_inner 74, state 13, dt rank 3, biases on the projections, tied head."""
    import transformers

    base = dict(vocab_size=101, hidden_size=37, num_hidden_layers=2, state_size=13, use_bias=True)
    return transformers.MambaConfig(**{**base, **overrides})


def mamba2_config(**overrides):
    """Mamba-2: 3 heads of 24 in one group, state 13, chunk 8, untied head."""
    import transformers

    base = dict(
        vocab_size=99,
        hidden_size=36,
        num_hidden_layers=2,
        num_heads=3,
        head_dim=24,
        state_size=13,
        n_groups=1,
        chunk_size=8,
        tie_word_embeddings=False,
    )
    return transformers.Mamba2Config(**{**base, **overrides})


def granite_config(**overrides):
    """Granite-4.0-H hybrid: Mamba-2 / attention / Mamba-2 without RoPE, dense MLP, the Granite
    multipliers away from 1 (so a missed one shows), tied head."""
    import transformers

    base = dict(
        vocab_size=97,
        hidden_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=10,
        mamba_d_head=8,
        mamba_d_state=13,
        mamba_n_groups=1,
        mamba_chunk_size=8,
        shared_intermediate_size=24,
        intermediate_size=12,
        num_local_experts=0,
        num_experts_per_tok=0,
        position_embedding_type="nope",
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        logits_scaling=2.0,
        attention_multiplier=0.3,
        tie_word_embeddings=True,
    )
    return transformers.GraniteMoeHybridConfig(**{**base, **overrides})


def perturb(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Move every parameter off its init: norm weights of exactly 1, D = 1, ... would hide mix-ups.
    Draws from ``generator``, or from the global RNG when None."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device))


def random_checkpoint(config, folder: Path, generator: torch.Generator | None = None) -> torch.nn.Module:
    """A transformers model from ``config`` (init under seed 0, then :func:`perturb` with
    ``generator``), saved to ``folder``; returns the model in eval mode."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb(model, generator)
    model.save_pretrained(folder)
    return model.eval()


def hf_gated_norm_group_size(norm: torch.nn.Module, hidden_size: int) -> int:
    """The group transformers' Mamba-2 gated RMSNorm normalises over: per group in releases whose
    norm takes ``group_size`` (5.23), over all channels at once in older ones (5.17 normalises a
    layer with several groups as one group, unlike mamba_ssm)."""
    return int(getattr(norm, "group_size", hidden_size))


def hf_gated_norm(hidden_size: int, group_size: int, eps: float) -> torch.nn.Module:
    """transformers' Mamba-2 gated RMSNorm with ``group_size`` where the installed release has it."""
    import inspect

    from transformers.models.mamba2 import modeling_mamba2

    norm_class = modeling_mamba2.MambaRMSNormGated
    if "group_size" in inspect.signature(norm_class.__init__).parameters:
        return norm_class(hidden_size, group_size=group_size, eps=eps)
    return norm_class(hidden_size, eps=eps)
