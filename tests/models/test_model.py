"""LanguageModel: config round trip, presets, forward and loss, packed sequences, cache decoding,
`ssmkit info`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ssmkit.models import PRESETS, LanguageModel, ModelConfig, get_preset, parameter_count
from tests.helpers import assert_close

TINY = ["tiny-mamba1", "tiny-mamba2", "tiny-hybrid", "tiny-s4"]


def fp64_scale(device: torch.device, cpu: float = 100.0) -> float:
    """Tolerance multiplier for fp64 comparisons. On CUDA the Mamba-2 SSD Triton kernel computes fp64
    inputs with fp32-level accuracy (1.3e-7 relative measured on an H100), so fp64 results agree
    only to ~1e-6 there; on the CPU every path is fp64 throughout."""
    return 1e4 if device.type == "cuda" else cpu


def _model(name: str, device: torch.device, dtype: torch.dtype = torch.float64) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(get_preset(name)).to(device=device, dtype=dtype)
    with torch.no_grad():  # move the norms off exactly 1 so that a skipped norm shows up
        for name_, p in model.named_parameters():
            if name_.endswith("norm.weight") or name_.endswith("norm_f.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_config_round_trips_through_json_and_yaml(tmp_path):
    config = get_preset("granite-4.0-h-350m")
    assert ModelConfig.from_json(config.to_json()) == config
    assert ModelConfig.from_yaml(config.to_yaml()) == config
    config.save(tmp_path / "c.yaml")
    assert ModelConfig.load(tmp_path / "c.yaml") == config
    config.save(tmp_path / "c.json")
    assert math.isinf(ModelConfig.load(tmp_path / "c.json").mamba2.dt_limit[1])


def test_config_rejects_unknown_keys_and_bad_layers():
    data = get_preset("tiny-mamba2").to_dict()
    data["d_modle"] = 3
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['d_modle'\]"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"layer_types\[1\] must be one of .* got 'mamba3'"):
        ModelConfig(n_layer=2, layer_types=["mamba1", "mamba3"])
    with pytest.raises(ValueError, match=r"layer_types must have n_layer \(3\) entries, got 2"):
        ModelConfig(n_layer=3, layer_types=["mamba1", "mamba1"])


# The Mamba paper's Table 12 names (Mamba-1) and the published Mamba-2 checkpoint names.
@pytest.mark.parametrize("name,expected,rel", [
    ("mamba-130m", 130e6, 0.02), ("mamba-370m", 370e6, 0.02), ("mamba-790m", 790e6, 0.02),
    ("mamba-1.4b", 1.4e9, 0.02), ("mamba-2.8b", 2.8e9, 0.02),
    # mamba2-1.3b really has 1.34B parameters (d_model 2048, 48 layers): its name rounds down.
    ("mamba2-130m", 130e6, 0.02), ("mamba2-370m", 370e6, 0.02), ("mamba2-780m", 780e6, 0.02),
    ("mamba2-1.3b", 1.3e9, 0.04), ("mamba2-2.7b", 2.7e9, 0.02),
])  # fmt: skip
def test_preset_parameter_counts(name, expected, rel):
    assert parameter_count(get_preset(name)) == pytest.approx(expected, rel=rel)


def test_granite_preset_has_the_published_shape():
    c = get_preset("granite-4.0-h-350m")
    assert (
        c.n_layer,
        c.d_model,
        c.mamba2_nheads,
        c.mamba2.headdim,
        c.mamba2.d_state,
        c.mamba2.ngroups,
        c.mamba2.expand,
    ) == (32, 768, 48, 32, 128, 1, 2)
    assert [i for i, k in enumerate(c.layer_types) if k == "attention"] == [10, 13, 17, 27]
    assert c.attention.rotary_dim == 0
    assert parameter_count(c) == pytest.approx(340e6, rel=0.01)


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_loss_and_vocab_padding(name, device):
    model = _model(name, device, torch.float32)
    config = model.config
    assert config.padded_vocab_size % 8 == 0 and config.padded_vocab_size >= config.vocab_size
    assert model.embedding.weight.shape[0] == config.padded_vocab_size
    ids = torch.randint(0, config.vocab_size, (2, 11), device=device)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 11, config.vocab_size)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1)
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tied_and_untied_heads():
    config = get_preset("tiny-mamba2")
    tied = LanguageModel(config)
    assert tied.lm_head is None and tied.head_weight() is tied.embedding.weight
    config.tie_embeddings = False
    untied = LanguageModel(config)
    assert untied.lm_head is not None
    assert untied.num_parameters() == tied.num_parameters() + config.padded_vocab_size * config.d_model


def test_out_proj_rescaled_by_depth():
    torch.manual_seed(0)
    config = get_preset("tiny-mamba2")
    config.n_layer, config.layer_types = 16, ["mamba2"] * 16
    scaled = LanguageModel(config).layers[0].mixer.out_proj.weight.std()
    config.rescale_prenorm_residual = False
    torch.manual_seed(0)
    plain = LanguageModel(config).layers[0].mixer.out_proj.weight.std()
    assert (scaled / plain).item() == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_packed_sequences_match_separate_calls(name, device):
    model = _model(name, device)
    lengths = [6, 1, 13]
    seqs = [torch.randint(0, model.config.vocab_size, (1, n), device=device) for n in lengths]
    cu = torch.tensor([0, 6, 7, 20], dtype=torch.int32, device=device)
    with torch.no_grad():
        packed = model(torch.cat(seqs, dim=1), cu_seqlens=cu, labels=torch.cat(seqs, dim=1))
        separate = [model(s).logits for s in seqs]
    assert_close(
        packed.logits,
        torch.cat(separate, dim=1),
        torch.float64,
        scale=fp64_scale(device),
        name=f"{name} packed",
    )
    # The loss never predicts the first token of a sequence from the previous sequence.
    targets = [
        torch.nn.functional.cross_entropy(lg[0, :-1], s[0, 1:], reduction="sum")
        for lg, s in zip(separate, seqs)
    ]
    expected = sum(targets) / sum(n - 1 for n in lengths)
    assert packed.loss.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("name", TINY)
def test_cached_decoding_matches_full_forward(name, device):
    model = _model(name, device)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device=device)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        # a prompt, a 3-token continuation from the cached state (chunked kernels), then single tokens
        steps = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:8], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 12)]
        assert cache.seqlen_offset == 12
        cache.reset()
        again = model(ids[:, :3], cache=cache).logits
    assert_close(
        torch.cat(steps, dim=1), full, torch.float64, scale=fp64_scale(device), name=f"{name} decode"
    )
    assert_close(again, full[:, :3], torch.float64, scale=fp64_scale(device), name=f"{name} after reset")


def test_forward_rejects_bad_inputs():
    model = LanguageModel(get_preset("tiny-mamba2"))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seqlen\), got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids must have an integer dtype"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"need batch size 1, got batch 2"):
        model(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must start at 0 and end at seqlen \(5\), got 0 \.\. 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache holds 1 sequences, input_ids has batch 2"):
        model(torch.zeros(2, 5, dtype=torch.long), cache=model.allocate_cache(1))


def test_info_command_prints_parameters_and_state(capsys, tmp_path):
    from ssmkit.cli import main

    assert main(["info", "granite-4.0-h-350m", "--json", str(tmp_path / "info.json")]) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "KV cache per token" in printed
    info = json.loads((tmp_path / "info.json").read_text())
    # 4 attention layers x (K and V) x 4 kv heads x head dim 64 x 2 bytes (bf16)
    assert info["kv_cache_bytes_per_token"] == 4 * 2 * 4 * 64 * 2
    # 28 Mamba-2 layers: SSM state 48 x 32 x 128 fp32 + conv window (1536 + 256) x 3 bf16
    assert info["recurrent_state_bytes_per_sequence"] == 28 * (48 * 32 * 128 * 4 + (1536 + 256) * 3 * 2)
    assert main(["info", "--list", "x"]) == 0
    assert set(PRESETS) <= set(capsys.readouterr().out.split())


def test_mlp_on_chosen_blocks_only(tmp_path):
    config = get_preset("tiny-hybrid")
    config.mlp.layers = [1]
    model = LanguageModel(config)
    assert [block.mlp is not None for block in model.layers] == [False, True, False]
    assert ModelConfig.from_yaml(config.to_yaml()) == config
    with pytest.raises(ValueError, match="no Hugging Face model type holds this config"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"mlp\.layers must be layer indices in 0\.\.2, got \[3\]"):
        config.mlp.layers = [3]
        config.validate()
