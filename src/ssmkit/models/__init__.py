"""Language models over the layers of :mod:`ssmkit.layers`: config, presets, Hugging Face interop.

- :class:`ModelConfig` — one dataclass (with one sub-dataclass per mixer family), JSON/YAML round trip.
- :class:`LanguageModel` — ``forward(input_ids, *, labels=None, cu_seqlens=None, cache=None)``;
  ``from_pretrained(path)`` / ``save_pretrained(path)`` for Hugging Face checkpoint folders.
- :func:`get_preset` / ``PRESETS`` — Mamba-1/Mamba-2 Table 12 sizes, Granite-4.0-H-350M, tiny configs.
- :class:`InferenceCache` — per-layer conv/SSM states and KV caches for decoding.
"""

from ssmkit.models.cache import InferenceCache
from ssmkit.models.config import (
    LAYER_TYPES,
    AttentionConfig,
    Mamba1Config,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    S4Config,
)
from ssmkit.models.hf import SUPPORTED_MODEL_TYPES, CheckpointError
from ssmkit.models.language_model import LanguageModel, LMOutput
from ssmkit.models.presets import PRESETS, get_preset, parameter_count

__all__ = [
    "LAYER_TYPES",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionConfig",
    "CheckpointError",
    "InferenceCache",
    "LMOutput",
    "LanguageModel",
    "MLPConfig",
    "Mamba1Config",
    "Mamba2Config",
    "ModelConfig",
    "S4Config",
    "get_preset",
    "parameter_count",
]
