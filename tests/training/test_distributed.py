"""``ssmkit train`` from the command line, alone and under ``torchrun`` with 2 CPU processes (gloo):
DDP and FSDP2 reach the same losses as one process with the same global batch, only rank 0
writes, and a checkpoint saved by 2 ranks resumes in 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssmkit.training.checkpoint import load_checkpoint
from ssmkit.training.metrics import LOG_FILE, read_log

pytest.importorskip("ssmkit.models", reason="ssmkit.models does not import yet")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "model": {"preset": "tiny-mamba2"},
    "data": {"kind": "random", "vocab_size": 101, "num_tokens": 4096, "seq_len": 16, "val_fraction": 0.0},
    "max_steps": 4,
    "device": "cpu",
    "progress": False,
    "tensorboard": False,
    "plots": False,
    "optim": {"lr": 0.01},
    "schedule": {"warmup_steps": 2},
    "checkpoint": {"every": 0, "golden": "none"},
}


def _run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher if nproc > 1 else [sys.executable]) + ["-m", "ssmkit", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(out_dir / LOG_FILE) if r["type"] == "step"]


def test_two_processes_match_one_and_checkpoints_change_world_size(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    _run(["--config", str(config), f"out_dir={tmp_path / 'one'}", "data.micro_batch_size=4"])
    ddp = _run(["--config", str(config), f"out_dir={tmp_path / 'ddp'}", "data.micro_batch_size=2"], nproc=2)
    _run(
        [
            "--config",
            str(config),
            f"out_dir={tmp_path / 'fsdp'}",
            "data.micro_batch_size=2",
            "distributed=fsdp",
        ],
        nproc=2,
    )

    one = _losses(tmp_path / "one")
    assert len(one) == 4
    for name in ("ddp", "fsdp"):
        assert _losses(tmp_path / name) == pytest.approx(one, rel=1e-5), name
    # Only rank 0 logs: one "start" line in the log, and rank 1 printed nothing at INFO level.
    starts = [r for r in read_log(tmp_path / "ddp" / LOG_FILE) if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    assert ddp.stderr.count("INFO ssmkit.training.trainer: start") == 1

    # The FSDP2 checkpoint holds full tensors and both ranks' RNG states; resume it in one process.
    checkpoint = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "step-00000004")
    assert checkpoint.metadata["world_size"] == 2 and len(checkpoint.trainer_state["rng"]) == 2
    resumed = _run(
        [
            "--config",
            str(config),
            f"out_dir={tmp_path / 'fsdp'}",
            "data.micro_batch_size=4",
            "max_steps=6",
            "--resume",
            "auto",
        ]
    )
    assert "RNG streams reseeded" in resumed.stderr
    continued = _run(
        [
            "--config",
            str(config),
            f"out_dir={tmp_path / 'one'}",
            "data.micro_batch_size=4",
            "max_steps=6",
            "--resume",
            "auto",
        ]
    )
    assert "resume" in continued.stderr
    assert _losses(tmp_path / "fsdp")[4:] == pytest.approx(_losses(tmp_path / "one")[4:], rel=1e-5)


def test_cli_errors_are_clear(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "ssmkit", "train", "data.kind=random", "optim.lrr=1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "unknown config keys ['optim.lrr']" in proc.stderr
