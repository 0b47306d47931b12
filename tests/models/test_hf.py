"""Hugging Face checkpoints in and out, against `transformers` itself (random weights, CPU, fp32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ssmkit.models import CheckpointError, LanguageModel, get_preset
from tests.hf_checkpoints import (
    granite_config,
    hf_gated_norm,
    mamba2_config,
    mamba_config,
    perturb,
    random_checkpoint,
)

transformers = pytest.importorskip("transformers", reason="transformers is the reference for whole models")

PROMPT_LEN = 19  # not a multiple of the chunk sizes (8)


def _hf_normalises_groups() -> bool:
    """Whether this transformers' Mamba-2 gated RMSNorm normalises each group separately (as
    mamba_ssm does, and transformers 5.23 does); some releases normalise over all groups at once,
    which only matters for configs with more than one group."""
    norm = hf_gated_norm(4, group_size=2, eps=1e-6)
    x = torch.tensor([[1.0, 1.0, 10.0, 10.0]])
    return bool(torch.allclose(norm(x), torch.ones(1, 4), atol=1e-3))


GROUPS_REASON = "this transformers normalises Mamba-2's gated RMSNorm over all groups at once (not per group)"


def _granite(**overrides):
    """Two groups in the Mamba-2 layers (and a larger eps), to cover the grouped gated norm."""
    return granite_config(**{"vocab_size": 99, "mamba_n_groups": 2, "rms_norm_eps": 1e-5, **overrides})


CONFIGS = {
    # Mamba-1, odd sizes (d_inner 74, state 13, dt rank 3), biases on the projections, tied head
    "mamba": mamba_config,
    # Mamba-2, 3 heads of 24 in 3 groups, state 13, untied head
    "mamba2-groups": lambda: mamba2_config(n_groups=3),
    # Mamba-2, one group, no conv bias, tied head
    "mamba2-tied": lambda: mamba2_config(
        vocab_size=64,
        hidden_size=48,
        num_heads=6,
        head_dim=16,
        state_size=8,
        use_conv_bias=False,
        tie_word_embeddings=True,
    ),
    # hybrid Mamba-2 / attention without RoPE, dense MLP, Granite multipliers
    "granite-dense": lambda: _granite(),
    # hybrid with routed experts and rotary embeddings, untied head
    "granite-moe-rope": lambda: _granite(
        num_local_experts=4, num_experts_per_tok=2, position_embedding_type="rope", tie_word_embeddings=False
    ),
    # Granite-4.0-H-350M's shape scaled down: 8 layers with 2 attention, 1 group, heads of 32, no RoPE
    "granite-4.0-h-small-shape": lambda: _granite(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=8,
        layer_types=["mamba"] * 2 + ["attention"] + ["mamba"] * 3 + ["attention"] + ["mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_d_state=16,
        mamba_n_groups=1,
        shared_intermediate_size=128,
        embedding_multiplier=12.0,
        residual_multiplier=0.246,
        logits_scaling=3.0,
        attention_multiplier=0.015625,
    ),
}


def _randomise(model: torch.nn.Module) -> None:
    """Perturb our own models' weights from seed 1 (the global RNG: the prompts drawn next follow it)."""
    torch.manual_seed(1)
    perturb(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the logit scale."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder written by transformers, its logits on a fixed prompt, the prompt)."""
    out = {}
    for name in CONFIGS:
        folder = tmp_path_factory.mktemp(name)
        model = random_checkpoint(CONFIGS[name](), folder, torch.Generator().manual_seed(1))
        ids = torch.randint(
            0, CONFIGS[name]().vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(2)
        )
        with torch.no_grad():
            out[name] = (folder, model(ids).logits, ids)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_checkpoint_round_trip(name, checkpoints, tmp_path):
    if name in ("mamba2-groups", "granite-dense", "granite-moe-rope") and not _hf_normalises_groups():
        pytest.skip(GROUPS_REASON)
    folder, hf_logits, ids = checkpoints[name]
    ours = LanguageModel.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = ours(ids).logits
    assert logits.shape == hf_logits.shape
    assert _rel(logits, hf_logits) < 1e-4, f"{name}: ours vs transformers {_rel(logits, hf_logits):.2e}"

    ours.save_pretrained(tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", local_files_only=True
    ).eval()
    with torch.no_grad():
        again = reloaded(ids).logits
    assert _rel(again, hf_logits) < 1e-4, f"{name}: our save -> transformers {_rel(again, hf_logits):.2e}"


@pytest.mark.parametrize("preset", ["tiny-mamba1", "tiny-mamba2", "tiny-hybrid"])
def test_our_models_load_in_transformers(preset, tmp_path):
    """A model built by us (vocabulary padded 101 -> 104) saves to a folder transformers reads."""
    if preset != "tiny-mamba1" and not _hf_normalises_groups():
        pytest.skip(GROUPS_REASON)
    torch.manual_seed(0)
    ours = LanguageModel(get_preset(preset)).eval()
    _randomise(ours)
    ids = torch.randint(0, 101, (1, PROMPT_LEN))
    ours.save_pretrained(tmp_path, max_shard_bytes=40_000)  # small shards: exercises the index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        expected, got = ours(ids).logits, hf(ids).logits
    assert _rel(got, expected) < 1e-4
    back = LanguageModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert _rel(back(ids).logits, expected) < 1e-6


def test_save_copies_tokenizer_files_and_reads_dtype(checkpoints, tmp_path):
    folder, _, _ = checkpoints["mamba2-tied"]
    source = tmp_path / "source"
    shutil.copytree(folder, source)
    (source / "tokenizer.json").write_text("{}")
    model = LanguageModel.from_pretrained(source, dtype=torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").read_text() == "{}"
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["dtype"] == "bfloat16"


def _copy(checkpoints, name: str, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoints[name][0], target)
    return target


def _edit_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoints, tmp_path):
    folder = _copy(checkpoints, "mamba2-groups", tmp_path)
    _edit_tensors(folder, lambda t: t.pop("backbone.layers.1.mixer.dt_bias"))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'backbone\.layers\.1\.mixer\.dt_bias' .* is missing from "
        r"model\.safetensors",
    ):
        LanguageModel.from_pretrained(folder)


def test_wrong_shape_is_named_with_file_and_shapes(checkpoints, tmp_path):
    folder = _copy(checkpoints, "granite-dense", tmp_path)

    def shrink(tensors):
        key = "model.layers.1.self_attn.q_proj.weight"
        tensors[key] = tensors[key][:-1].contiguous()

    _edit_tensors(folder, shrink)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.q_proj\.weight' "
        r"must have shape \(40, 40\) for this config, got \(39, 40\)",
    ):
        LanguageModel.from_pretrained(folder)


def test_unexpected_tensor_is_named(checkpoints, tmp_path):
    folder = _copy(checkpoints, "mamba", tmp_path)
    _edit_tensors(folder, lambda t: t.__setitem__("backbone.layers.0.mixer.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .* backbone\.layers\.0\.mixer\.extra"):
        LanguageModel.from_pretrained(folder)


def test_unknown_model_type_lists_the_supported_ones(checkpoints, tmp_path):
    folder = _copy(checkpoints, "mamba", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model_type 'llama' is not supported; supported model types: "
        r"mamba, mamba2, granitemoehybrid",
    ):
        LanguageModel.from_pretrained(folder)


def test_truncated_safetensors_is_named(checkpoints, tmp_path):
    folder = _copy(checkpoints, "mamba", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        LanguageModel.from_pretrained(folder)


def test_missing_files_are_clear_errors(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LanguageModel.from_pretrained(tmp_path / "nowhere")
    folder = _copy(checkpoints, "mamba", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.safetensors weights"):
        LanguageModel.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        LanguageModel.from_pretrained(folder)


def test_missing_shard_is_named(tmp_path):
    model = LanguageModel(get_preset("tiny-mamba2"))
    model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"{shards[-1].name} \(listed in model\.safetensors\.index\.json"
    ):
        LanguageModel.from_pretrained(tmp_path)


def test_configs_without_a_transformers_type_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no Hugging Face model type holds this config"):
        LanguageModel(get_preset("tiny-s4")).save_pretrained(tmp_path)
