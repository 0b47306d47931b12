"""Greedy generation equals transformers' greedy generation for every checkpoint type we load
(random weights, CPU, fp32): transformers writes the checkpoint, we load it and generate."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import LanguageModel
from tests.hf_checkpoints import granite_config, mamba2_config, mamba_config, random_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is the reference for whole models")

NEW_TOKENS = 12


CONFIGS = {
    "mamba": mamba_config,
    "mamba2": mamba2_config,
    "granitemoehybrid": granite_config,
    "granitemoehybrid-moe-rope": lambda: granite_config(
        num_local_experts=4, num_experts_per_tok=2, position_embedding_type="rope", tie_word_embeddings=False
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = (random_checkpoint(make(), folder, torch.Generator().manual_seed(1)), folder)
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
