"""Training: a plain loop (:mod:`.trainer`) and the components around it.

- :mod:`.config` — :class:`TrainConfig` (YAML + ``key=value`` overrides)
- :mod:`.optim` — AdamW parameter groups by name; :mod:`.schedule` — warmup + cosine to a floor
- :mod:`.checkpoint` — atomic, verified, sharded checkpoints; keep-last-K and golden
- :mod:`.guards` — non-finite / spike guard with in-memory snapshots and rollback
- :mod:`.grad_monitor`, :mod:`.state_monitor`, :mod:`.recovery` — the stability toolkit
- :mod:`.metrics` — JSONL, TensorBoard, progress bar, plots; :mod:`.distributed` — DDP / FSDP2
- :mod:`.bench` — training throughput and MFU of a preset against a same-size Transformer
"""

from ssmkit.training.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from ssmkit.training.config import TrainConfig, load_config
from ssmkit.training.guards import TrainingDiverged
from ssmkit.training.trainer import Trainer, TrainResult, build_model, train

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_model",
    "load_checkpoint",
    "load_config",
    "train",
]
