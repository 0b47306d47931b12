"""Named model shapes: the Mamba paper's Table 12 sizes (Mamba-1 and Mamba-2), Granite-4.0-H-350M,
and tiny configs for tests."""

from __future__ import annotations

import copy
from collections.abc import Callable

from ssmkit.models.config import (
    AttentionConfig,
    GroundedConfig,
    Mamba1Config,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
)

# (Mamba-1 name, Mamba-2 name, n_layer, d_model): the GPT-3-like ladder of Table 12, with two
# Mamba layers per Transformer layer (a Mamba block has ~6 d^2 parameters where attention + MLP
# have ~12 d^2). The Mamba-2 checkpoints of the same shapes were published under slightly
# different names (fewer parameters per layer: no x_proj/dt_proj).
_TABLE_12 = (
    ("130m", "130m", 24, 768),
    ("370m", "370m", 48, 1024),
    ("790m", "780m", 48, 1536),
    ("1.4b", "1.3b", 48, 2048),
    ("2.8b", "2.7b", 64, 2560),
)

# Granite-4.0-H-350M: attention at these 4 of its 32 layers, Mamba-2 elsewhere (published config).
_GRANITE_350M_ATTENTION = (10, 13, 17, 27)


def _mamba1(n_layer: int, d_model: int) -> Callable[[], ModelConfig]:
    return lambda: ModelConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=50277,
        pad_vocab_size_multiple=8,
        default_layer="mamba1",
        mamba1=Mamba1Config(d_state=16, d_conv=4, expand=2),
    )


def _mamba2(n_layer: int, d_model: int) -> Callable[[], ModelConfig]:
    return lambda: ModelConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=50277,
        pad_vocab_size_multiple=16,
        default_layer="mamba2",
        mamba2=Mamba2Config(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1),
    )


def _granite_350m() -> ModelConfig:
    layer_types = ["attention" if i in _GRANITE_350M_ATTENTION else "mamba2" for i in range(32)]
    return ModelConfig(
        d_model=768,
        n_layer=32,
        vocab_size=100352,
        pad_vocab_size_multiple=16,
        layer_types=layer_types,
        mamba2=Mamba2Config(d_state=128, d_conv=4, expand=2, headdim=32, ngroups=1, chunk_size=256),
        attention=AttentionConfig(num_heads=12, num_kv_heads=4, rotary_dim=0, softmax_scale=0.015625),
        mlp=MLPConfig(d_intermediate=2048),
        norm_eps=1e-5,
        residual_in_fp32=False,
        tie_embeddings=True,
        embedding_multiplier=12.0,
        residual_multiplier=0.246,
        logits_scaling=3.0,
        rescale_prenorm_residual=False,
        pad_token_id=100256,
        bos_token_id=100257,
        eos_token_id=100257,
    )


def _grounded_minimal() -> ModelConfig:
    """The GroundedMamba document's starting point: dim 512, depth 8, SSM state 16, 4 memory heads."""
    return ModelConfig(
        d_model=512,
        n_layer=8,
        vocab_size=10000,
        default_layer="grounded",
        grounded=GroundedConfig(d_state=16, num_heads=4),
    )


def _grounded_production() -> ModelConfig:
    """The document's configuration section: dim 2048, depth 24, SSM state 64, 16 heads of 128,
    a memory bank of 4096 slots read by 4 retrieval heads."""
    grounded = GroundedConfig(d_state=64, num_heads=16, head_dim=128, memory_size=4096, retrieval_heads=4)
    return ModelConfig(
        d_model=2048, n_layer=24, vocab_size=10000, default_layer="grounded", grounded=grounded
    )


def _tiny(kind: str) -> Callable[[], ModelConfig]:
    """Tiny odd-sized configs for tests: seconds on a CPU."""

    def build() -> ModelConfig:
        common = dict(d_model=48, n_layer=2, vocab_size=101, pad_vocab_size_multiple=8)
        if kind == "mamba1":
            return ModelConfig(**common, default_layer="mamba1", mamba1=Mamba1Config(d_state=5, expand=2))
        if kind == "mamba2":
            return ModelConfig(
                **common,
                default_layer="mamba2",
                mamba2=Mamba2Config(d_state=7, headdim=16, ngroups=2, chunk_size=8),
            )
        if kind == "s4":
            return ModelConfig(**common, default_layer="s4", mlp=MLPConfig(d_intermediate=64))
        if kind == "grounded":
            grounded = GroundedConfig(
                d_state=5,
                num_heads=4,
                memory_size=32,
                memory_update_every=3,
                gate_fixed_steps=4,
                chunk_size=8,
            )
            return ModelConfig(**common, default_layer="grounded", grounded=grounded)
        # hybrid: Granite-like, one attention layer among Mamba-2 layers, with an MLP per block
        return ModelConfig(
            d_model=48,
            n_layer=3,
            vocab_size=101,
            pad_vocab_size_multiple=8,
            layer_types=["mamba2", "attention", "mamba2"],
            mamba2=Mamba2Config(d_state=7, headdim=16, ngroups=2, chunk_size=8),
            attention=AttentionConfig(num_heads=4, num_kv_heads=2, rotary_dim=0),
            mlp=MLPConfig(d_intermediate=40),
            residual_in_fp32=False,
        )

    return build


PRESETS: dict[str, Callable[[], ModelConfig]] = {}
for _name1, _name2, _n_layer, _d_model in _TABLE_12:
    PRESETS[f"mamba-{_name1}"] = _mamba1(_n_layer, _d_model)
    PRESETS[f"mamba2-{_name2}"] = _mamba2(_n_layer, _d_model)
PRESETS["granite-4.0-h-350m"] = _granite_350m
PRESETS["grounded-minimal"] = _grounded_minimal
PRESETS["grounded-production"] = _grounded_production
for _kind in ("mamba1", "mamba2", "s4", "hybrid", "grounded"):
    PRESETS[f"tiny-{_kind}"] = _tiny(_kind)


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for a preset name (see ``PRESETS``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())


def parameter_count(config: ModelConfig) -> int:
    """Number of parameters of a model built from ``config``, without allocating it."""
    import torch

    from ssmkit.models.language_model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(config)
    return model.num_parameters()
