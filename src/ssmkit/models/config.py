"""Model configuration: one dataclass per mixer family, gathered in :class:`ModelConfig`.

A config round-trips through plain dicts, JSON and YAML (``to_dict``/``from_dict``,
``save``/``load``); unknown keys are an error so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("mamba1", "mamba2", "attention", "s4", "grounded")


@dataclass
class Mamba1Config:
    """Mamba-1 (S6) mixer. ``dt_rank=None`` means ceil(d_model / 16), as in the paper."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"  # "random" or "constant": how dt_proj.weight is initialised
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4


@dataclass
class Mamba2Config:
    """Mamba-2 (SSD) mixer: ``expand * d_model = nheads * headdim``; B and C are shared by
    ``ngroups`` groups of heads; the gated RMSNorm normalises each group separately."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    norm_before_gate: bool = False
    norm_eps: float | None = None  # None: the model's norm_eps


@dataclass
class AttentionConfig:
    """Multi-head attention with grouped key/value heads. ``rotary_dim=0`` disables rotary
    embeddings (Granite-4.0-H uses none); ``softmax_scale=None`` means 1/sqrt(head_dim)."""

    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rotary_dim: int | None = None  # None: head_dim; 0: no rotary embedding
    rope_theta: float = 10000.0
    softmax_scale: float | None = None
    bias: bool = False


@dataclass
class S4Config:
    """S4D layer (diagonal state space, ZOH discretisation, FFT convolution)."""

    d_state: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    init: str = "real"  # "real": A = -(1..n) (S4D-Real); "lin": A = -1/2 + i*pi*n (S4D-Lin)


@dataclass
class GroundedConfig:
    """GroundedMamba mixer (:class:`ssmkit.layers.grounded.GroundedMixer`): a stable selective SSM
    and an RWKV-style grounded memory mixed by a gate fixed at ``gate_fixed_ssm`` for the first
    ``gate_fixed_steps`` training calls, learned afterwards."""

    d_state: int = 16
    expand: int = 2
    dt_rank: int | None = None
    discretization: str = "euler"  # "euler": A_d = I + A*dt; "zoh": matrix exponential
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_bias_init: tuple[float, float] = (1.0, 0.5)
    spectral_bound: float = 0.999
    num_heads: int = 4
    head_dim: int | None = None  # None: d_model // num_heads
    memory_size: int = 1024
    memory_alpha: float = 0.01
    memory_update_every: int = 100
    retrieval_heads: int = 1
    chunk_size: int = 64
    gate_fixed_ssm: float = 0.7
    gate_fixed_steps: int = 1000
    gate_history_size: int = 1000
    norm_eps: float | None = None  # None: the model's norm_eps


@dataclass
class MLPConfig:
    """Gated MLP (SwiGLU) after each mixer when ``d_intermediate > 0``; with ``num_experts > 0``
    a top-k mixture of experts (each of width ``expert_intermediate``) is added to it, as in
    Granite's shared-expert MoE. ``layers`` lists the blocks that get the MLP (None: every block)."""

    d_intermediate: int = 0
    layers: list[int] | None = None
    bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 2
    expert_intermediate: int = 0


@dataclass
class ModelConfig:
    """A language model: embedding, ``n_layer`` blocks (mixer, optional MLP), final norm, head.

    ``layer_types`` lists the mixer of every layer (one of ``LAYER_TYPES``); left empty, every
    layer is ``default_layer``. The multipliers default to 1 and reproduce Granite's
    scaled embeddings, residual branches and logits.
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 8
    layer_types: list[str] = field(default_factory=list)
    default_layer: str = "mamba1"
    mamba1: Mamba1Config = field(default_factory=Mamba1Config)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    s4: S4Config = field(default_factory=S4Config)
    grounded: GroundedConfig = field(default_factory=GroundedConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by this (Granite's convention)
    initializer_range: float = 0.02
    # Training-time dropout on the embedding output and on every mixer/MLP branch before its
    # residual add (nanoGPT's placement; no attention-probability dropout). 0 in every preset.
    dropout: float = 0.0
    rescale_prenorm_residual: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [self.default_layer] * self.n_layer
        self.layer_types = list(self.layer_types)
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else m * math.ceil(self.vocab_size / m)

    def has_mlp(self, layer: int) -> bool:
        """Whether block ``layer`` has an MLP after its mixer."""
        return self.mlp.d_intermediate > 0 and (self.mlp.layers is None or layer in self.mlp.layers)

    @property
    def mamba1_dt_rank(self) -> int:
        return self.mamba1.dt_rank if self.mamba1.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def mamba2_nheads(self) -> int:
        return self.mamba2.expand * self.d_model // self.mamba2.headdim

    @property
    def attention_head_dim(self) -> int:
        a = self.attention
        return a.head_dim if a.head_dim is not None else self.d_model // a.num_heads

    @property
    def attention_kv_heads(self) -> int:
        a = self.attention
        return a.num_kv_heads if a.num_kv_heads is not None else a.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the offending field when the sizes are inconsistent."""
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if len(self.layer_types) != self.n_layer:
            raise ValueError(
                f"layer_types must have n_layer ({self.n_layer}) entries, got {len(self.layer_types)}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] must be one of {LAYER_TYPES}, got {kind!r}")
        if "mamba2" in self.layer_types:
            m2 = self.mamba2
            d_inner = m2.expand * self.d_model
            if d_inner % m2.headdim != 0:
                raise ValueError(
                    f"mamba2.expand * d_model ({d_inner}) must be divisible by mamba2.headdim ({m2.headdim})"
                )
            nheads = d_inner // m2.headdim
            if nheads % m2.ngroups != 0:
                raise ValueError(
                    f"mamba2 nheads ({nheads}) must be divisible by mamba2.ngroups ({m2.ngroups})"
                )
        if "attention" in self.layer_types:
            a = self.attention
            if a.head_dim is None and self.d_model % a.num_heads != 0:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by attention.num_heads ({a.num_heads}) "
                    "when attention.head_dim is not given"
                )
            if a.num_heads % self.attention_kv_heads != 0:
                raise ValueError(
                    f"attention.num_heads ({a.num_heads}) must be divisible by attention.num_kv_heads "
                    f"({self.attention_kv_heads})"
                )
            rotary = self.attention_head_dim if a.rotary_dim is None else a.rotary_dim
            if rotary % 2 != 0 or rotary > self.attention_head_dim:
                raise ValueError(
                    f"attention.rotary_dim ({rotary}) must be even and at most head_dim "
                    f"({self.attention_head_dim})"
                )
        if "grounded" in self.layer_types:
            g = self.grounded
            head_dim = g.head_dim or self.d_model // g.num_heads
            if head_dim < 1 or (g.num_heads * head_dim) % g.retrieval_heads != 0:
                raise ValueError(
                    f"grounded: num_heads * head_dim ({g.num_heads} * {head_dim}) must be positive and "
                    f"divisible by grounded.retrieval_heads ({g.retrieval_heads})"
                )
            if g.discretization not in ("euler", "zoh"):
                raise ValueError(
                    f"grounded.discretization must be 'euler' or 'zoh', got {g.discretization!r}"
                )
        if self.mlp.layers is not None:
            bad = [i for i in self.mlp.layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"mlp.layers must be layer indices in 0..{self.n_layer - 1}, got {bad}")
        if self.mlp.num_experts > 0 and not 0 < self.mlp.experts_per_token <= self.mlp.num_experts:
            raise ValueError(
                f"mlp.experts_per_token ({self.mlp.experts_per_token}) must be in 1..num_experts "
                f"({self.mlp.num_experts})"
            )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # JSON has no infinity: write it as a string that from_dict reads back.
        out["mamba2"]["dt_limit"] = [_encode_float(v) for v in self.mamba2.dt_limit]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        nested = {
            "mamba1": Mamba1Config,
            "mamba2": Mamba2Config,
            "attention": AttentionConfig,
            "s4": S4Config,
            "grounded": GroundedConfig,
            "mlp": MLPConfig,
        }
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        for key, value in data.items():
            if key in nested:
                sub_cls = nested[key]
                if isinstance(value, sub_cls):
                    kwargs[key] = value
                    continue
                sub_known = {f.name for f in dataclasses.fields(sub_cls)}
                bad = sorted(set(value) - sub_known)
                if bad:
                    raise ValueError(f"unknown {key} config keys {bad}; known keys: {sorted(sub_known)}")
                value = dict(value)
                if "dt_bias_init" in value:
                    value["dt_bias_init"] = tuple(value["dt_bias_init"])
                if "dt_limit" in value:
                    value["dt_limit"] = tuple(_decode_float(v) for v in value["dt_limit"])
                kwargs[key] = sub_cls(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ModelConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON or YAML (chosen by the suffix) atomically."""
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        text = path.read_text()
        return cls.from_yaml(text) if path.suffix in (".yaml", ".yml") else cls.from_json(text)


def _encode_float(value: float) -> float | str:
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else value


def _decode_float(value: float | str) -> float:
    return float(value)


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
