"""Training configuration: one dataclass per concern, gathered in :class:`TrainConfig`.

A config is read from YAML and then changed by ``key=value`` overrides with the same dotted names
(``optim.lr=1e-3 data.seq_len=512 model.d_model=256``); values are parsed as YAML and converted to
the field's type. Unknown keys are an error, so that a typo never falls back to a default silently.
``model`` is a free dictionary: ``preset`` (a name from ``ssmkit.models.PRESETS``), ``init_from``
(a checkpoint folder to start from) and any :class:`ssmkit.models.ModelConfig` field over the preset.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Parameters that are excluded from weight decay whatever their group (fnmatch patterns on the
# parameter's name): biases and norm gains would only be pulled to zero; A_log, D and dt_bias set
# the SSM's time scales and skip connection, and decaying them changes the dynamics, not the size.
# GroundedMamba's: A_raw (its spectral normalisation sets the time scales), the WKV log_decay and
# time_first, and the per-head GroupNorm ln_x.
DEFAULT_NO_DECAY = [
    "*bias", "*norm*", "*A_log", "*.D", "D", "*dt_bias", "*A_raw", "*log_decay", "*time_first", "*ln_x.*"
]  # fmt: skip


@dataclass
class DataConfig:
    """kind: "text" (a UTF-8 file, tokenized here), "tokens" (a .npy/.bin token file, memory-mapped)
    or "random" (uniform random ids, for benchmarks). tokenizer: "char", "bpe" or a folder holding
    a tokenizer. Without val_path the last val_fraction of the data is the validation split."""

    kind: str = "text"
    path: str | None = None
    val_path: str | None = None
    tokenizer: str = "char"
    bpe_vocab_size: int = 4096
    doc_separator: str | None = None
    vocab_size: int | None = None
    eos_id: int | None = None
    token_dtype: str | None = None
    num_tokens: int = 1_000_000
    seq_len: int = 256
    micro_batch_size: int = 8
    packing: bool = True
    # "windows": fixed non-overlapping windows, shuffled per epoch; "random": every window starts
    # at a uniformly drawn token (nanoGPT's sampling; see ssmkit.data.packing).
    sampling: str = "windows"
    val_fraction: float = 0.05
    seed: int = 1234


@dataclass
class OptimConfig:
    """AdamW. ``groups``: a list of ``{name, params: [patterns], lr_mult, weight_decay}``; a
    parameter joins the first group whose fnmatch pattern matches its name, else the default group
    (lr_mult 1, ``weight_decay``). Names matching ``no_decay`` never get weight decay; the embedding
    joins them when it is tied to the output head."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=lambda: list(DEFAULT_NO_DECAY))
    groups: list[dict] = field(default_factory=list)
    foreach: bool | None = None


@dataclass
class ScheduleConfig:
    """Linear warmup to the peak lr, then ``decay`` ("cosine", "linear" or "constant") to
    ``min_lr_ratio`` times the peak at the last step."""

    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class CheckpointConfig:
    """every: steps between saves (0: only at the end). resume: None, "auto" (the newest good
    checkpoint of out_dir, if any) or a checkpoint folder. golden: "best_val" (refreshed when the
    validation loss improves), "final" (the last checkpoint of the run) or "none". enabled=false
    writes no checkpoint at all (benchmarks)."""

    enabled: bool = True
    every: int = 1000
    keep_last: int = 3
    max_shard_bytes: int = 2 * 10**9
    resume: str | None = None
    golden: str = "best_val"
    verify: str = "checksum"


@dataclass
class GuardConfig:
    """Non-finite and spike guard (see :mod:`ssmkit.training.guards`)."""

    enabled: bool = True
    max_bad_steps: int = 3
    window: int = 50
    snapshots: int = 5
    snapshot_every: int = 50
    lr_factor: float = 0.7
    spike_lr_factor: float = 0.5
    spike_factor: float = 3.0
    spike_warmup: int = 20
    ema_beta: float = 0.95
    max_rollbacks: int = 10
    replay_data: bool = False
    max_names: int = 10


@dataclass
class MonitorConfig:
    """grad_every / state_every: steps between gradient / SSM-state reports (0: off).
    state_penalty: weight of the auxiliary loss on state norms above state_target (0: off; needs
    data.packing=false, because packed sequences do not return their final states)."""

    grad_every: int = 0
    zero_nonfinite_grads: bool = False
    sparsity_threshold: float = 0.9
    flip_cosine: float = -0.5
    collapse_norm: float = 1e-7
    alert_score: float = 0.25
    state_every: int = 0
    state_warn: float = 100.0
    state_penalty: float = 0.0
    state_target: float = 10.0


@dataclass
class AuxConfig:
    """Weights of the auxiliary losses (see :mod:`ssmkit.training.aux_losses`); all 0 (off) by
    default, and then the trainer computes nothing extra. The objective is ``loss + sum(w * term)``.

    state_norm, memory_consistency: weights of the terms of that name reported by every module with
    an ``auxiliary_losses(target_norm=...)`` method (GroundedMamba's mixers), called with
    ``target_norm=state_target``. output_consistency: weight of the mean L2 norm of the change of
    the logits from one position to the next. terms: weights of any other reported term, by name.
    reduction: how one term reported by several modules (one per layer) is combined, "mean" (the
    weight does not depend on depth) or "sum" (the GroundedMamba document's loop adds the layers).
    """

    state_norm: float = 0.0
    memory_consistency: float = 0.0
    output_consistency: float = 0.0
    state_target: float = 5.0
    terms: dict = field(default_factory=dict)
    reduction: str = "mean"

    def weights(self) -> dict[str, float]:
        """Every configured weight by term name (zeros included)."""
        named = {
            "state_norm": self.state_norm,
            "memory_consistency": self.memory_consistency,
            "output_consistency": self.output_consistency,
        }
        # PyYAML reads "1e-2" as a string: convert here, with the term named when it is no number.
        for name, value in self.terms.items():
            if name in named:
                raise ValueError(f"aux.terms.{name}: set aux.{name} instead (it has its own field)")
            if isinstance(value, bool):
                raise ValueError(f"aux.terms.{name} must be a number, got {value!r}")
            try:
                named[str(name)] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"aux.terms.{name} must be a number, got {value!r}") from None
        return named

    @property
    def enabled(self) -> bool:
        return any(w > 0 for w in self.weights().values())


@dataclass
class RecoveryConfig:
    """every: steps between checks for stuck SSM parameters (0: off). A ``A_log`` entry is stuck
    when exp(A_log) leaves [a_min, a_max] or is not finite; a parameter is stuck when it moved by
    less than ``stuck_tol`` (relative) over ``every`` steps; stuck ones get noise of
    ``noise_std`` times their own std (soft reset)."""

    every: int = 0
    a_min: float = 1e-4
    a_max: float = 1e4
    stuck_tol: float = 1e-7
    noise_std: float = 0.01
    patterns: list[str] = field(default_factory=lambda: ["*A_log", "*dt_bias", "*dt_proj.bias", "*.D"])


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "tiny-mamba2"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    out_dir: str = "runs/default"
    max_steps: int = 1000
    # Stop (final evaluation and checkpoint included) once the optimizer steps have taken this many
    # seconds in all (evaluation and checkpoints not counted); 0: no limit. For comparisons at equal
    # wall time; the schedule still runs over max_steps, so a run stopped early ends mid-schedule.
    max_seconds: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    distributed: str = "ddp"
    eval_every: int = 0
    eval_batches: int = 8
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    peak_flops: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range or inconsistent."""
        choices = {
            "data.kind": (self.data.kind, ("text", "tokens", "random")),
            "data.sampling": (self.data.sampling, ("windows", "random")),
            "schedule.decay": (self.schedule.decay, ("cosine", "linear", "constant")),
            "checkpoint.golden": (self.checkpoint.golden, ("best_val", "final", "none")),
            "checkpoint.verify": (self.checkpoint.verify, ("checksum", "size")),
            "precision": (self.precision, ("fp32", "bf16")),
            "distributed": (self.distributed, ("ddp", "fsdp")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        positive = {
            "max_steps": self.max_steps,
            "grad_accum": self.grad_accum,
            "data.seq_len": self.data.seq_len,
            "data.micro_batch_size": self.data.micro_batch_size,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "guard.snapshots": self.guard.snapshots,
            "guard.snapshot_every": self.guard.snapshot_every,
            "checkpoint.max_shard_bytes": self.checkpoint.max_shard_bytes,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (math.isfinite(self.max_seconds) and self.max_seconds >= 0):
            raise ValueError(
                f"max_seconds must be a finite number >= 0 (0: no limit), got {self.max_seconds!r}"
            )
        if self.data.kind in ("text", "tokens") and not self.data.path:
            raise ValueError(f"data.path is required for data.kind={self.data.kind!r}")
        if self.monitor.state_penalty > 0 and self.data.packing:
            raise ValueError(
                "monitor.state_penalty needs data.packing=false: packed sequences (cu_seqlens) do not return "
                "their final SSM states"
            )
        for name, weight in self.aux.weights().items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"aux weight {name!r} must be a finite number >= 0, got {weight!r}")
        if self.aux.reduction not in ("mean", "sum"):
            raise ValueError(f"aux.reduction must be one of ('mean', 'sum'), got {self.aux.reduction!r}")
        if not math.isfinite(self.aux.state_target):
            raise ValueError(f"aux.state_target must be finite, got {self.aux.state_target}")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}")
        if "preset" not in self.model and "init_from" not in self.model:
            raise ValueError("model needs a 'preset' (see ssmkit.models.PRESETS) or an 'init_from' folder")

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        config = _from_dict(cls, data, "")
        config.validate()
        return config


def _plain(value: Any) -> Any:
    """Tuples become lists so that yaml.safe_dump writes plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML value to the field's type: PyYAML reads ``3e-4`` as a string, and a
    command-line ``1`` for a float field should be 1.0."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(f"{name}: cannot read {value!r} as {hint}: {'; '.join(errors)}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") if args else v for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], "1e-3" read as YAML)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override must look like key=value (e.g. optim.lr=1e-3), got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override key must be a dotted name (e.g. optim.lr), got {key!r}")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with every ``key=value`` override applied (nested keys are created)."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {key} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    data = apply_overrides(data, overrides or [])
    return TrainConfig.from_dict(data)
