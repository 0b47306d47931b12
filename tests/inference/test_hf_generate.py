"""Greedy generation equals transformers' greedy generation for every checkpoint type we load
(random weights, CPU, fp32): transformers writes the checkpoint, we load it and generate."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import LanguageModel

transformers = pytest.importorskip("transformers", reason="transformers is the reference for whole models")

NEW_TOKENS = 12


def _granite(**overrides):
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
    base.update(overrides)
    return transformers.GraniteMoeHybridConfig(**base)


CONFIGS = {
    "mamba": lambda: transformers.MambaConfig(
        vocab_size=101, hidden_size=37, num_hidden_layers=2, state_size=13, use_bias=True
    ),
    "mamba2": lambda: transformers.Mamba2Config(
        vocab_size=99,
        hidden_size=36,
        num_hidden_layers=2,
        num_heads=3,
        head_dim=24,
        state_size=13,
        n_groups=1,
        chunk_size=8,
        tie_word_embeddings=False,
    ),
    "granitemoehybrid": lambda: _granite(),
    "granitemoehybrid-moe-rope": lambda: _granite(
        num_local_experts=4, num_experts_per_tok=2, position_embedding_type="rope", tie_word_embeddings=False
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make())
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model.eval(), folder)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_transformers(name, checkpoints):
    hf, folder = checkpoints[name]
    ours = LanguageModel.from_pretrained(folder).eval()
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (2, 11), generator=gen)  # 11: not a multiple of the chunk size 8
    hf.generation_config.eos_token_id = None  # run the full length, no early stop
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    expected = expected[:, ids.shape[1] :].tolist()
    got = ours.generate(ids, max_new_tokens=NEW_TOKENS).sequences
    assert got == expected, f"{name}: ours {got} vs transformers {expected}"
