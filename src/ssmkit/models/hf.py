"""Hugging Face checkpoint folders in and out: ``mamba``, ``mamba2`` and ``granitemoehybrid``.

A folder holds ``config.json``, weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, and optionally tokenizer files. Reading maps the config onto a
:class:`ModelConfig` and every tensor name onto ours (checking shapes); writing does the reverse
so that ``transformers`` loads the folder. Nothing here touches the network: a missing file is an
error that names it. ``transformers`` itself is never imported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ssmkit.models.config import (
    AttentionConfig,
    Mamba1Config,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    atomic_write_text,
)

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mamba", "mamba2", "granitemoehybrid")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read: the message names the file and the tensor."""


# ==================================================================== configs
def _require(hf: dict[str, Any], key: str, path: Path) -> Any:
    if key not in hf:
        raise CheckpointError(
            f"{path / 'config.json'}: missing required key {key!r} for model_type {hf['model_type']!r}"
        )
    return hf[key]


def _check_act(hf: dict[str, Any], path: Path) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{path / 'config.json'}: hidden_act {act!r} is not supported (only 'silu')")


def config_from_hf(hf: dict[str, Any], path: Path = Path(".")) -> ModelConfig:
    """Map a Hugging Face ``config.json`` (as a dict) onto a :class:`ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path / 'config.json'}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_act(hf, path)
    d_model = int(_require(hf, "hidden_size", path))
    n_layer = int(_require(hf, "num_hidden_layers", path))
    common = dict(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=int(_require(hf, "vocab_size", path)),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id")
        if not isinstance(hf.get("eos_token_id"), list)
        else hf["eos_token_id"][0],
    )
    if model_type == "mamba":
        rank = hf.get("time_step_rank", "auto")
        m1 = Mamba1Config(
            d_state=int(hf.get("state_size", 16)),
            d_conv=int(hf.get("conv_kernel", 4)),
            expand=int(hf.get("expand", 2)),
            dt_rank=None if rank == "auto" else int(rank),
            conv_bias=bool(hf.get("use_conv_bias", True)),
            proj_bias=bool(hf.get("use_bias", False)),
            dt_min=float(hf.get("time_step_min", 0.001)),
            dt_max=float(hf.get("time_step_max", 0.1)),
            dt_init=hf.get("time_step_init_scheme", "random"),
            dt_scale=float(hf.get("time_step_scale", 1.0)),
            dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
        )
        return ModelConfig(
            **common,
            layer_types=["mamba1"] * n_layer,
            mamba1=m1,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            rescale_prenorm_residual=bool(hf.get("rescale_prenorm_residual", False)),
        )
    if model_type == "mamba2":
        expand = int(hf.get("expand", 2))
        headdim = int(hf.get("head_dim", 64))
        nheads = int(hf.get("num_heads", expand * d_model // headdim))
        if nheads * headdim != expand * d_model:
            raise CheckpointError(
                f"{path / 'config.json'}: num_heads * head_dim ({nheads} * {headdim}) must equal "
                f"expand * hidden_size ({expand} * {d_model})"
            )
        m2 = Mamba2Config(
            d_state=int(hf.get("state_size", 128)),
            d_conv=int(hf.get("conv_kernel", 4)),
            expand=expand,
            headdim=headdim,
            ngroups=int(hf.get("n_groups", 1)),
            chunk_size=int(hf.get("chunk_size", 256)),
            conv_bias=bool(hf.get("use_conv_bias", True)),
            proj_bias=bool(hf.get("use_bias", False)),
            dt_min=float(hf.get("time_step_min", 0.001)),
            dt_max=float(hf.get("time_step_max", 0.1)),
            dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
            dt_limit=_dt_limit(hf.get("time_step_limit")),
            norm_before_gate=False,
        )
        return ModelConfig(
            **common,
            layer_types=["mamba2"] * n_layer,
            mamba2=m2,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rescale_prenorm_residual=bool(hf.get("rescale_prenorm_residual", False)),
        )
    # granitemoehybrid
    kinds = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * n_layer
    layer_types = []
    for i, kind in enumerate(kinds):
        if kind in ("mamba", "linear_attention"):
            layer_types.append("mamba2")
        elif kind in ("attention", "full_attention"):
            layer_types.append("attention")
        else:
            raise CheckpointError(
                f"{path / 'config.json'}: layer_types[{i}] = {kind!r} is not 'mamba' or 'attention'"
            )
    expand = int(hf.get("mamba_expand", 2))
    nheads = int(hf.get("mamba_n_heads", 128))
    headdim = hf.get("mamba_d_head", "auto")
    headdim = expand * d_model // nheads if headdim in (None, "auto") else int(headdim)
    if nheads * headdim != expand * d_model:
        raise CheckpointError(
            f"{path / 'config.json'}: mamba_n_heads * mamba_d_head ({nheads} * {headdim}) must equal "
            f"mamba_expand * hidden_size ({expand} * {d_model})"
        )
    eps = float(hf.get("rms_norm_eps", 1e-6))
    m2 = Mamba2Config(
        d_state=int(hf.get("mamba_d_state", 256)),
        d_conv=int(hf.get("mamba_d_conv", 4)),
        expand=expand,
        headdim=headdim,
        ngroups=int(hf.get("mamba_n_groups", 1)),
        chunk_size=int(hf.get("mamba_chunk_size", 256)),
        conv_bias=bool(hf.get("mamba_conv_bias", True)),
        proj_bias=bool(hf.get("mamba_proj_bias", False)),
        dt_limit=_dt_limit(hf.get("time_step_limit")),
        norm_before_gate=False,
        norm_eps=eps,
    )
    num_heads = int(hf.get("num_attention_heads", 32))
    head_dim = int(hf.get("head_dim") or d_model // num_heads)
    position = hf.get("position_embedding_type")
    rope = hf.get("rope_parameters") or {}
    if position == "rope":
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(
                f"{path / 'config.json'}: only default full rotary embeddings are supported, got {rope}"
            )
    attention = AttentionConfig(
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rotary_dim=head_dim if position == "rope" else 0,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        softmax_scale=float(hf.get("attention_multiplier", 1.0)),
        bias=bool(hf.get("attention_bias", False)),
    )
    num_experts = int(hf.get("num_local_experts") or 0)
    mlp = MLPConfig(
        d_intermediate=int(hf.get("shared_intermediate_size", 1024)),
        num_experts=num_experts,
        experts_per_token=int(hf.get("num_experts_per_tok") or 0) if num_experts else 2,
        expert_intermediate=int(hf.get("intermediate_size", 0)) if num_experts else 0,
    )
    return ModelConfig(
        **common,
        layer_types=layer_types,
        mamba2=m2,
        attention=attention,
        mlp=mlp,
        norm_eps=eps,
        residual_in_fp32=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
        rescale_prenorm_residual=False,
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


def _dt_limit(value: Any) -> tuple[float, float]:
    if value is None:
        return (0.0, math.inf)
    low, high = value
    return (_json_float(low), _json_float(high))


def _json_float(value: Any) -> float:
    """transformers >= 5 writes infinity as {"__float__": "Infinity"}; older versions wrote Infinity."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def hf_model_type(config: ModelConfig) -> str:
    """The Hugging Face model type that can hold ``config``, or a ValueError saying why none can."""
    kinds = set(config.layer_types)
    multipliers = (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling)
    scaled = multipliers != (1.0, 1.0, 1.0)
    every_block_mlp = config.mlp.d_intermediate > 0 and all(config.has_mlp(i) for i in range(config.n_layer))
    if kinds == {"mamba1"} and config.mlp.d_intermediate == 0 and not scaled:
        return "mamba"
    if kinds == {"mamba2"} and config.mlp.d_intermediate == 0 and not scaled:
        return "mamba2"
    if kinds <= {"mamba2", "attention"} and every_block_mlp:
        return "granitemoehybrid"
    raise ValueError(
        f"no Hugging Face model type holds this config (layer types {sorted(kinds)}, mlp.d_intermediate "
        f"{config.mlp.d_intermediate}); supported: all-mamba1 without MLP (mamba), all-mamba2 without MLP "
        "(mamba2), mamba2/attention with a gated MLP in every block (granitemoehybrid)"
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` contents for ``config`` (see :func:`hf_model_type`)."""
    model_type = hf_model_type(config)
    c = config
    common: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layer,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
    }
    if model_type == "mamba":
        m = c.mamba1
        return {
            **common,
            "architectures": ["MambaForCausalLM"],
            "state_size": m.d_state,
            "conv_kernel": m.d_conv,
            "expand": m.expand,
            "time_step_rank": c.mamba1_dt_rank,
            "use_conv_bias": m.conv_bias,
            "use_bias": m.proj_bias,
            "time_step_min": m.dt_min,
            "time_step_max": m.dt_max,
            "time_step_init_scheme": m.dt_init,
            "time_step_scale": m.dt_scale,
            "time_step_floor": m.dt_init_floor,
            "layer_norm_epsilon": c.norm_eps,
            "residual_in_fp32": c.residual_in_fp32,
            # An init-time flag, but transformers (5.x) also applies it to loaded out_proj weights.
            "rescale_prenorm_residual": False,
        }
    m = c.mamba2
    if m.norm_before_gate:
        raise ValueError(
            f"{model_type} checkpoints apply the gate before the norm; mamba2.norm_before_gate must be False"
        )
    if m.norm_eps is not None and m.norm_eps != c.norm_eps:
        raise ValueError(
            f"{model_type} checkpoints use one eps for every norm; mamba2.norm_eps ({m.norm_eps}) "
            f"!= norm_eps ({c.norm_eps})"
        )
    dt_limit = [m.dt_limit[0], m.dt_limit[1] if math.isfinite(m.dt_limit[1]) else float("inf")]
    if model_type == "mamba2":
        return {
            **common,
            "architectures": ["Mamba2ForCausalLM"],
            "num_heads": c.mamba2_nheads,
            "head_dim": m.headdim,
            "state_size": m.d_state,
            "conv_kernel": m.d_conv,
            "expand": m.expand,
            "n_groups": m.ngroups,
            "chunk_size": m.chunk_size,
            "use_conv_bias": m.conv_bias,
            "use_bias": m.proj_bias,
            "time_step_min": m.dt_min,
            "time_step_max": m.dt_max,
            "time_step_floor": m.dt_init_floor,
            "time_step_limit": dt_limit,
            "layer_norm_epsilon": c.norm_eps,
            "residual_in_fp32": c.residual_in_fp32,
            # An init-time flag, but transformers (5.x) also applies it to loaded out_proj weights.
            "rescale_prenorm_residual": False,
        }
    a = c.attention
    head_dim = c.attention_head_dim
    rotary = head_dim if a.rotary_dim is None else a.rotary_dim
    if rotary not in (0, head_dim):
        raise ValueError(f"granitemoehybrid supports full rotary embeddings or none, got rotary_dim {rotary}")
    if head_dim * a.num_heads != c.d_model:
        raise ValueError(
            f"granitemoehybrid needs attention head_dim * num_heads == d_model, got {head_dim} * "
            f"{a.num_heads} != {c.d_model}"
        )
    if c.mlp.bias:
        raise ValueError("granitemoehybrid MLPs have no bias; mlp.bias must be False")
    out = {
        **common,
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "layer_types": ["mamba" if k == "mamba2" else "attention" for k in c.layer_types],
        "mamba_n_heads": c.mamba2_nheads,
        "mamba_d_head": m.headdim,
        "mamba_d_state": m.d_state,
        "mamba_d_conv": m.d_conv,
        "mamba_expand": m.expand,
        "mamba_n_groups": m.ngroups,
        "mamba_chunk_size": m.chunk_size,
        "mamba_conv_bias": m.conv_bias,
        "mamba_proj_bias": m.proj_bias,
        "time_step_limit": dt_limit,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": c.attention_kv_heads,
        "attention_bias": a.bias,
        "attention_multiplier": a.softmax_scale if a.softmax_scale is not None else head_dim**-0.5,
        "position_embedding_type": "rope" if rotary else "nope",
        "shared_intermediate_size": c.mlp.d_intermediate,
        "num_local_experts": c.mlp.num_experts,
        "num_experts_per_tok": c.mlp.experts_per_token if c.mlp.num_experts else 0,
        "intermediate_size": c.mlp.expert_intermediate if c.mlp.num_experts else c.mlp.d_intermediate,
        "rms_norm_eps": c.norm_eps,
        "embedding_multiplier": c.embedding_multiplier,
        "residual_multiplier": c.residual_multiplier,
        "logits_scaling": c.logits_scaling,
        "initializer_range": c.initializer_range,
    }
    if rotary:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": a.rope_theta}
    return out


# ==================================================================== tensor names
def name_map(config: ModelConfig, model_type: str) -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face names it may be stored under (the first is written)."""
    names: dict[str, list[str]] = {}
    if model_type in ("mamba", "mamba2"):
        names["embedding.weight"] = ["backbone.embeddings.weight", "backbone.embedding.weight"]
        names["norm_f.weight"] = ["backbone.norm_f.weight"]
        for i, _ in enumerate(config.layer_types):
            hf, ours = f"backbone.layers.{i}", f"layers.{i}"
            names[f"{ours}.norm.weight"] = [f"{hf}.norm.weight"]
            params = ["A_log", "D", "conv1d.weight", "in_proj.weight", "out_proj.weight"]
            params += (
                ["x_proj.weight", "dt_proj.weight", "dt_proj.bias"]
                if model_type == "mamba"
                else ["dt_bias", "norm.weight"]
            )
            m = config.mamba1 if model_type == "mamba" else config.mamba2
            if m.conv_bias:
                params.append("conv1d.bias")
            if m.proj_bias:
                params += ["in_proj.bias", "out_proj.bias"]
            for p in params:
                names[f"{ours}.mixer.{p}"] = [f"{hf}.mixer.{p}"]
    else:
        names["embedding.weight"] = ["model.embed_tokens.weight"]
        names["norm_f.weight"] = ["model.norm.weight"]
        for i, kind in enumerate(config.layer_types):
            hf, ours = f"model.layers.{i}", f"layers.{i}"
            names[f"{ours}.norm.weight"] = [f"{hf}.input_layernorm.weight"]
            names[f"{ours}.norm2.weight"] = [f"{hf}.post_attention_layernorm.weight"]
            if kind == "mamba2":
                params = [
                    "A_log",
                    "D",
                    "dt_bias",
                    "conv1d.weight",
                    "in_proj.weight",
                    "norm.weight",
                    "out_proj.weight",
                ]
                if config.mamba2.conv_bias:
                    params.append("conv1d.bias")
                if config.mamba2.proj_bias:
                    params += ["in_proj.bias", "out_proj.bias"]
                for p in params:
                    names[f"{ours}.mixer.{p}"] = [f"{hf}.mamba.{p}"]
            else:
                for ours_p, hf_p in (
                    ("q_proj", "q_proj"),
                    ("k_proj", "k_proj"),
                    ("v_proj", "v_proj"),
                    ("out_proj", "o_proj"),
                ):
                    names[f"{ours}.mixer.{ours_p}.weight"] = [f"{hf}.self_attn.{hf_p}.weight"]
                    if config.attention.bias:
                        names[f"{ours}.mixer.{ours_p}.bias"] = [f"{hf}.self_attn.{hf_p}.bias"]
            names[f"{ours}.mlp.shared.fc1.weight"] = [f"{hf}.shared_mlp.input_linear.weight"]
            names[f"{ours}.mlp.shared.fc2.weight"] = [f"{hf}.shared_mlp.output_linear.weight"]
            if config.mlp.num_experts:
                # Original Granite checkpoints use the first spelling; transformers >= 5 renames them
                # in memory to the second and writes the first back.
                names[f"{ours}.mlp.experts.router"] = [
                    f"{hf}.block_sparse_moe.router.layer.weight",
                    f"{hf}.block_sparse_moe.router.weight",
                ]
                names[f"{ours}.mlp.experts.fc1"] = [
                    f"{hf}.block_sparse_moe.input_linear.weight",
                    f"{hf}.block_sparse_moe.experts.gate_up_proj",
                ]
                names[f"{ours}.mlp.experts.fc2"] = [
                    f"{hf}.block_sparse_moe.output_linear.weight",
                    f"{hf}.block_sparse_moe.experts.down_proj",
                ]
    if not config.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    return names


# ==================================================================== reading
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (checkpoints are read from local folders only)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        for name, file in weight_map.items():
            if not (folder / file).is_file():
                raise FileNotFoundError(
                    f"{folder / file} (listed in {index.name} for tensor {name!r}) does not exist"
                )
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {others}; convert them to safetensors first)" if others else ""
        raise FileNotFoundError(
            f"{folder} holds no *.safetensors weights and no model.safetensors.index.json{hint}"
        )
    out: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                    out[name] = file
        except Exception as err:  # safetensors raises its own error types; name the file
            raise CheckpointError(
                f"{file}: cannot read safetensors header ({err}); is the file truncated?"
            ) from err
    return out


def load_tensors(files: dict[str, Path], wanted: list[str]) -> dict[str, torch.Tensor]:
    """Read the ``wanted`` tensors, opening each file once."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                available = set(f.keys())
                for name in names:
                    if name not in available:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} is listed in the index but not in the file"
                        )
                    try:
                        out[name] = f.get_tensor(name)
                    except Exception as err:
                        raise CheckpointError(
                            f"{file}: cannot read tensor {name!r} ({err}); is the file truncated?"
                        ) from err
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"{file}: cannot read safetensors file ({err}); is the file truncated?"
            ) from err
    return out


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None):
    """Build a :class:`LanguageModel` from a local Hugging Face checkpoint folder.

    dtype: the parameters' dtype (default: the checkpoint's). The tokenizer files, when present,
    stay in the folder; ``model.source_path`` remembers it.
    """
    from ssmkit.models.language_model import LanguageModel

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {folder} does not exist (no network access: pass a local folder)"
        )
    hf_config = _read_json(folder / "config.json")
    config = config_from_hf(hf_config, folder)
    model_type = hf_config["model_type"]
    files = weight_files(folder)
    names = name_map(config, model_type)

    chosen: dict[str, str] = {}
    for ours, candidates in names.items():
        found = next((c for c in candidates if c in files), None)
        if found is None:
            raise CheckpointError(
                f"{folder}: tensor {candidates[0]!r} (for {ours}) is missing from "
                f"{', '.join(sorted({p.name for p in files.values()}))}"
            )
        chosen[ours] = found
    used = set(chosen.values())
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(n for n in files if n not in used and n not in ignorable)
    if unexpected:
        shown = ", ".join(f"{n} (in {files[n].name})" for n in unexpected[:8])
        raise CheckpointError(
            f"{folder}: unexpected tensors for model_type {model_type!r}: {shown}"
            + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        )

    tensors = load_tensors(files, list(chosen.values()))
    # Build on the meta device and adopt the loaded tensors: no random init of weights that are
    # overwritten anyway, and no fp32 copy of a bf16 checkpoint.
    with torch.device("meta"):
        model = LanguageModel(config)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for ours, hf_name in chosen.items():
        value = tensors[hf_name]
        target = params[ours]
        if (
            ours in ("embedding.weight", "lm_head.weight")
            and value.dim() == 2
            and value.shape[1] == target.shape[1]
            and value.shape[0] == config.vocab_size
            and target.shape[0] > value.shape[0]
        ):
            # The checkpoint's vocabulary is unpadded; our rows beyond it are never predicted.
            value = torch.cat([value, value.new_zeros(target.shape[0] - value.shape[0], value.shape[1])])
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{files[hf_name]}: tensor {hf_name!r} must have shape {tuple(target.shape)} for this "
                f"config, got {tuple(value.shape)}"
            )
        state[ours] = value
    checkpoint_dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    target_dtype = dtype or checkpoint_dtype
    state = {name: value.to(target_dtype) for name, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.source_path = folder
    return model


# ==================================================================== writing
def export_state(model, model_type: str) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor (vocabulary rows trimmed to vocab_size, contiguous)."""
    config = model.config
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for ours, hf_names in name_map(config, model_type).items():
        value = params[ours].detach()
        if ours in ("embedding.weight", "lm_head.weight"):
            value = value[: config.vocab_size]
        out[hf_names[0]] = value.contiguous().clone()
    return out


def _save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(model, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors weights (sharded with an index beyond
    ``max_shard_bytes``), and copy tokenizer files from the folder the model was loaded from."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.config)
    tensors = export_state(model, hf_config["model_type"])
    dtype = next(iter(tensors.values())).dtype
    hf_config["dtype"] = str(dtype).replace("torch.", "")
    metadata = {"format": "pt"}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
    stale = list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json"))
    if len(shards) == 1:
        written = [folder / "model.safetensors"]
        _save_file_atomic(shards[0], written[0], metadata)
    else:
        written, weight_map = [], {}
        for k, shard in enumerate(shards):
            file = folder / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _save_file_atomic(shard, file, metadata)
            written.append(file)
            weight_map.update({name: file.name for name in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
        written.append(folder / "model.safetensors.index.json")
    for old in stale:
        if old not in written and old.exists():
            old.unlink()  # a shard of an earlier, differently sharded save would confuse loaders
    atomic_write_text(folder / "config.json", json.dumps(hf_config, indent=2))

    source = getattr(model, "source_path", None)
    if source is not None and Path(source).resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, folder / name)
