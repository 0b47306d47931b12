"""Load the model an evaluation command names: a preset, a Hugging Face folder, a training
checkpoint folder or a training run's output folder.

``ssmkit eval perplexity``, ``ssmkit eval long-context`` and ``ssmkit check`` all take
``CHECKPOINT_OR_PRESET``; :func:`load_model` resolves it, in this order:

1. a preset name (``ssmkit.models.PRESETS``): a freshly initialised model (seeded), for smoke tests
   and for measuring a shape's speed and memory;
2. a folder with ``config.json`` (Hugging Face layout): :meth:`LanguageModel.from_pretrained`;
3. a training checkpoint folder (``step-N`` or ``golden``, with ``metadata.json``): the model config
   recorded by the trainer plus the checkpoint's weights;
4. a training run folder (with ``checkpoints/``): its golden checkpoint, else its newest good one.

The tokenizer, when there is one, is found beside the weights (a Hugging Face folder) or in the
run's ``tokenizer/`` folder.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """model: in eval mode on the requested device and dtype. kind: "preset", "hf", "checkpoint".
    tokenizer_folder: where a saved tokenizer lives (None: none found). train_seq_len: the training
    sequence length recorded with a checkpoint (None when unknown)."""

    model: nn.Module
    source: str
    kind: str
    tokenizer_folder: Path | None = None
    train_seq_len: int | None = None


def _checkpoint_folder(run: Path) -> Path:
    from ssmkit.training.checkpoint import CheckpointManager

    manager = CheckpointManager(run / "checkpoints")
    if manager.golden_folder.is_dir():
        return manager.golden_folder
    steps = manager.steps()
    if not steps:
        raise FileNotFoundError(f"{run}/checkpoints holds no checkpoint (no golden, no step-N folder)")
    return manager.step_folder(steps[-1])


def _train_seq_len(config_yaml: str) -> int | None:
    import yaml

    try:
        data = yaml.safe_load(config_yaml) or {}
        value = data.get("data", {}).get("seq_len")
        return int(value) if value is not None else None
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


def load_model(
    spec: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoadedModel:
    """Resolve ``spec`` (see the module docstring) and return the model in eval mode."""
    from ssmkit.models import PRESETS, LanguageModel, ModelConfig, get_preset

    device = torch.device(device)
    text = str(spec)
    if text in PRESETS:
        torch.manual_seed(seed)
        model = LanguageModel(get_preset(text))
        return LoadedModel(model.to(device=device, dtype=dtype).eval(), text, "preset")

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    if (path / "config.json").is_file():
        model = LanguageModel.from_pretrained(path, dtype=dtype)
        tokenizer = (
            path if any((path / n).is_file() for n in ("tokenizer.json", "char_tokenizer.json")) else None
        )
        return LoadedModel(model.to(device).eval(), text, "hf", tokenizer_folder=tokenizer)

    run_dir = None
    if (path / "checkpoints").is_dir():
        run_dir = path
        path = _checkpoint_folder(path)
        logger.info("loading %s from run %s", path.name, run_dir)
    elif path.parent.name == "checkpoints":
        run_dir = path.parent.parent
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a model folder: expected config.json (Hugging Face), metadata.json "
            "(a training checkpoint) or a checkpoints/ folder (a training run)"
        )
    from ssmkit.training.checkpoint import load_checkpoint, load_model_state

    metadata = json.loads((path / "metadata.json").read_text())
    if not metadata.get("model_config"):
        raise ValueError(f"{path}/metadata.json has no model_config: cannot rebuild the model")
    checkpoint = load_checkpoint(path, verify="size")
    model = LanguageModel(ModelConfig.from_dict(metadata["model_config"]))
    load_model_state(model, checkpoint.model_state)
    tokenizer = None
    if run_dir is not None and (run_dir / "tokenizer").is_dir():
        tokenizer = run_dir / "tokenizer"
    return LoadedModel(
        model.to(device=device, dtype=dtype).eval(),
        str(path),
        "checkpoint",
        tokenizer_folder=tokenizer,
        train_seq_len=_train_seq_len(checkpoint.config_yaml),
    )
