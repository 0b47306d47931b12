"""Atomic, verifiable training checkpoints.

A checkpoint is a folder::

    step-00001200/
      model-00001-of-00002.safetensors ...   weights, sharded (max_shard_bytes each, default 2 GB)
      model.safetensors.index.json           which tensor lives in which shard (Hugging Face layout)
      optimizer.safetensors, optimizer.json  optimizer state keyed by parameter name
      trainer_state.json                     step, data position, schedule, guard, RNG states per rank
      config.yaml, metadata.json             the training config; parameter count, dtype, time, version
      manifest.json                          size and sha256 of every file above, written last

It is written into a temporary sibling folder, every file and the folder fsynced, then renamed into
place, so a reader sees either the whole checkpoint or none of it: a process killed mid-write
leaves a ``.tmp-*`` folder that the next save removes, and the previous checkpoint untouched.
``manifest.json`` doubles as the proof that the write finished and as the check against later
truncation or corruption (:class:`CheckpointError` names the file and what is wrong).

State is stored by parameter name and gathered to full tensors (``DTensor.full_tensor()`` under
FSDP2), so a checkpoint saved with one world size loads with any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
METADATA = "metadata.json"
GOLDEN = "golden"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, truncated or corrupted."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` reads: model_state and the optimizer's per-parameter tensors
    on the CPU, by name; the rest as plain JSON/YAML values."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]
    optimizer_meta: dict[str, Any]
    trainer_state: dict[str, Any]
    config_yaml: str
    metadata: dict[str, Any]


# ---------------------------------------------------------------- gathering state by name
def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: FSDP2 shards are gathered (a collective: every rank calls it)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``model.state_dict()``; ``model`` is the unwrapped module (not DDP).
    Tensors shared under several names (tied weights) stay shared in the copy."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        # Tied weights share memory; FSDP2's DTensors are compared through their local shard (a
        # DTensor wrapper itself has no storage to compare).
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        key = (
            (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if local.numel()
            else (name,)
        )
        if key not in copies:
            copies[key] = _full(tensor).clone()
        out[name] = copies[key]
    return out


def gather_optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors, meta): per-parameter state tensors by parameter name, and per group its name,
    parameter names and hyperparameters. Needs ``param_names`` in every group
    (:func:`ssmkit.training.optim.build_optimizer` adds them)."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    groups = []
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if names is None or len(names) != len(group["params"]):
            raise ValueError("every optimizer param group needs 'param_names' (use build_optimizer)")
        for name, param in zip(names, group["params"]):
            state = optimizer.state.get(param, {})
            tensors[name] = {
                k: _full(v).clone() if torch.is_tensor(v) else torch.tensor(v) for k, v in state.items()
            }
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append({"param_names": list(names), "hyper": _jsonable(hyper)})
    return tensors, {"groups": groups}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def _place_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` on ``like``'s device, sharded like it when ``like`` is an FSDP2 DTensor."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)
    return full.to(like.device)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a by-name state into ``model`` (exact copies; shards placed as the model's are)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    with torch.no_grad():
        for name, target in own.items():
            source = state[name]
            if source.shape != target.shape:
                raise CheckpointError(
                    f"checkpoint tensor {name} has shape {tuple(source.shape)}, "
                    f"the model's is {tuple(target.shape)}"
                )
            target.copy_(_place_like(source.to(target.dtype), target))


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Put saved per-parameter state back by name. Hyperparameters stay as the current config set
    them; the schedule sets the lr of every step."""
    for group in optimizer.param_groups:
        for name, param in zip(group["param_names"], group["params"]):
            if name not in tensors:
                raise CheckpointError(f"checkpoint has no optimizer state for parameter {name}")
            saved = tensors[name]
            if not saved:
                optimizer.state.pop(param, None)
                continue
            state = {}
            for key, value in saved.items():
                # AdamW keeps 'step' as a CPU scalar unless capturable/fused: keep its device.
                state[key] = (
                    value.clone() if key == "step" and value.dim() == 0 else _place_like(value, param)
                )
            optimizer.state[param] = state


# ---------------------------------------------------------------- writing
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1))
    _fsync_file(path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def shard_names(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one name, alias the rest."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, tensor in state.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases


def write_checkpoint(
    folder: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, dict[str, torch.Tensor]],
    optimizer_meta: dict[str, Any],
    trainer_state: dict[str, Any],
    config_yaml: str,
    metadata: dict[str, Any],
    max_shard_bytes: int = 2 * 10**9,
) -> Path:
    """Write a checkpoint to ``folder`` atomically (temporary sibling, fsync, rename); an existing
    ``folder`` is replaced only once the new one is complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        unique, aliases = _dedupe(model_state)
        shards = shard_names(unique, max_shard_bytes)
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _save_tensors(tmp / file, {n: unique[n] for n in names})
            weight_map.update({n: file for n in names})
        total = sum(t.numel() * t.element_size() for t in unique.values())
        _write_json(
            tmp / WEIGHTS_INDEX,
            {"metadata": {"total_size": total, "aliases": aliases}, "weight_map": weight_map},
        )
        flat = {
            f"{name}::{key}": value for name, state in optimizer_state.items() for key, value in state.items()
        }
        _save_tensors(tmp / OPTIMIZER_TENSORS, flat)
        _write_json(tmp / OPTIMIZER_META, optimizer_meta)
        _write_json(tmp / TRAINER_STATE, trainer_state)
        (tmp / CONFIG).write_text(config_yaml)
        _fsync_file(tmp / CONFIG)
        _write_json(tmp / METADATA, metadata)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "version": 1,
            "files": {
                name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files
            },
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        if folder.exists():
            # Replace in two renames; the old folder is deleted only after the new one is in place.
            old = folder.parent / f".old-{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------- reading
def verify_checkpoint(folder: str | os.PathLike, *, checksum: bool = True) -> dict[str, Any]:
    """Check that ``folder`` is a complete checkpoint whose files have the recorded sizes (and
    sha256 digests); return its manifest or raise :class:`CheckpointError` saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: its write did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({err})") from None
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint {folder}: file {name} has {size} bytes, expected {entry['bytes']} (truncated?)"
            )
        if checksum and _sha256(path) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {folder}: file {name} is corrupted (sha256 does not match the manifest)"
            )
    return manifest


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {folder}: cannot read {name} ({err})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {path.name} ({err})") from None


def load_checkpoint(folder: str | os.PathLike, *, verify: str = "checksum") -> Checkpoint:
    """Verify and read a checkpoint folder (``verify``: "checksum" or "size")."""
    folder = Path(folder)
    verify_checkpoint(folder, checksum=verify == "checksum")
    index = _read_json(folder, WEIGHTS_INDEX)
    model_state: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        model_state.update(_load_tensors(folder / file))
    for alias, name in index["metadata"].get("aliases", {}).items():
        model_state[alias] = model_state[name]
    optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
    meta = _read_json(folder, OPTIMIZER_META)
    for group in meta["groups"]:
        for name in group["param_names"]:
            optimizer_state[name] = {}
    for flat, tensor in _load_tensors(folder / OPTIMIZER_TENSORS).items():
        name, key = flat.rsplit("::", 1)
        optimizer_state.setdefault(name, {})[key] = tensor
    return Checkpoint(
        path=folder,
        model_state=model_state,
        optimizer_state=optimizer_state,
        optimizer_meta=meta,
        trainer_state=_read_json(folder, TRAINER_STATE),
        config_yaml=(folder / CONFIG).read_text(),
        metadata=_read_json(folder, METADATA),
    )


# ---------------------------------------------------------------- a run's folder of checkpoints
class CheckpointManager:
    """The ``checkpoints/`` folder of a run: ``step-N`` folders (the last ``keep_last`` kept) and a
    ``golden`` folder that rotation never touches."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep_last: int = 3,
        max_shard_bytes: int = 2 * 10**9,
        verify: str = "checksum",
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.max_shard_bytes = max_shard_bytes
        self.verify = verify

    def step_folder(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    @property
    def golden_folder(self) -> Path:
        return self.root / GOLDEN

    def steps(self) -> list[int]:
        """Steps of the ``step-N`` folders present, oldest first (complete or not)."""
        if not self.root.is_dir():
            return []
        found = (_STEP_RE.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def remove_stale_temporaries(self) -> None:
        """Clean up after a writer that was killed: ``.tmp-*`` folders (unfinished writes) are
        deleted; an ``.old-NAME-*`` folder (a replaced checkpoint) is deleted when ``NAME`` exists,
        and renamed back to ``NAME`` when the kill came between the two renames of a replacement."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith(".old-"):
                # ".old-{name}-{pid}-{nanoseconds}"
                name = path.name[len(".old-") :].rsplit("-", 2)[0]
                if not (self.root / name).exists():
                    logger.warning(
                        "restoring %s from %s, left by an interrupted replacement", name, path.name
                    )
                    os.replace(path, self.root / name)
                    continue
            if path.name.startswith((".tmp-", ".old-")):
                logger.warning("removing %s, left by an interrupted checkpoint write", path)
                shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, **state: Any) -> Path:
        """Write ``step-N`` (arguments as :func:`write_checkpoint`), then delete the oldest beyond
        ``keep_last``: the previous checkpoint survives until this one is complete."""
        self.remove_stale_temporaries()
        path = write_checkpoint(self.step_folder(step), max_shard_bytes=self.max_shard_bytes, **state)
        for old in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.step_folder(old), ignore_errors=True)
            logger.info("removed checkpoint step-%08d (keep_last=%d)", old, self.keep_last)
        return path

    def promote_golden(self, source: str | os.PathLike) -> Path:
        """Make ``source`` (a complete checkpoint) the golden one, through a temporary folder of
        hard links (copies where links are not possible) and a rename."""
        source = Path(source)
        verify_checkpoint(source, checksum=False)
        tmp = self.root / f".tmp-{GOLDEN}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        try:
            for file in source.iterdir():
                try:
                    os.link(file, tmp / file.name)
                except OSError:
                    shutil.copy2(file, tmp / file.name)
                    _fsync_file(tmp / file.name)
            _fsync_dir(tmp)
            target = self.golden_folder
            if target.exists():
                old = self.root / f".old-{GOLDEN}-{os.getpid()}-{time.monotonic_ns()}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("golden checkpoint is now %s", source.name)
        return self.golden_folder

    def candidates(self) -> list[Path]:
        """Folders to resume from, best first: step folders newest first, then the golden one."""
        out = [self.step_folder(s) for s in reversed(self.steps())]
        if self.golden_folder.is_dir():
            out.append(self.golden_folder)
        return out

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies and reads; broken ones are logged and skipped.
        None when there is none at all; CheckpointError when every one is broken."""
        failures = []
        for path in self.candidates():
            try:
                checkpoint = load_checkpoint(path, verify=self.verify)
            except CheckpointError as err:
                logger.warning("cannot resume from %s: %s; trying an older checkpoint", path.name, err)
                failures.append(str(err))
                continue
            if failures:
                logger.warning(
                    "resuming from %s after skipping %d broken checkpoint(s)", path.name, len(failures)
                )
            return checkpoint
        if failures:
            raise CheckpointError(
                "no loadable checkpoint in {}:\n  {}".format(self.root, "\n  ".join(failures))
            )
        return None
