"""The command line runs end to end on tiny problems (smoke tests: they check it works, not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssmkit.cli import main


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "demo" in out


def test_demo_ops_runs_every_operator(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long cells in a narrow captured terminal
    assert main(["demo", "ops", "--seqlen", "64"]) == 0
    out = capsys.readouterr().out
    for name in (
        "mamba_chunk_scan_combined",
        "selective_scan_fn",
        "selective_state_update",
        "causal_conv1d_fn",
        "rms_norm_gated",
        "s4d",
    ):
        assert name in out


def test_demo_trains_both_models_on_selective_copying(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's first command, end to end at a tiny size: both rows trained, the summary line
    printed with both accuracies, results.json and the plot written."""
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "demo"
    args = ["demo", "--smoke", "--steps", "3", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "selective-copying"
    assert [r["label"] for r in results["rows"]] == ["Mamba-1 (S6)", "S4 (LTI)"]
    assert [r["steps"] for r in results["rows"]] == [3, 3]
    assert results["torch_threads"] == 1 and results["device"] == "cpu"
    assert (out / "accuracy.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    summary = next(line for line in printed.splitlines() if line.startswith("Accuracy on the copied"))
    for row in results["rows"]:
        assert f"{row['label']} {100 * row['accuracy']:.1f}%" in summary
    assert str(out / "accuracy.png") in printed


def test_demo_runs_the_cpu_default_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain ``ssmkit demo`` trains exactly the CPU default of ``ssmkit eval selective-copying``."""
    import ssmkit.commands.eval as eval_command
    from ssmkit.evaluation.tasks import SelectiveCopyingConfig

    seen = {}

    def fake(task, config, out, **kwargs):
        seen.update(task=task, config=config, out=out)
        return {"rows": [], "json": str(out / "results.json"), "plot": str(out / "accuracy.png")}

    monkeypatch.setattr(eval_command, "run_synthetic_task", fake)
    assert main(["demo", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert seen["task"] == "selective-copying" and seen["out"] == tmp_path
    assert seen["config"] == SelectiveCopyingConfig(device="cpu")


def test_demo_threads_auto_uses_free_cores_only() -> None:
    from ssmkit.commands.demo import auto_threads

    assert auto_threads(cores=2, load=0.4) == 2  # idle 2-core machine: both cores
    assert auto_threads(cores=16, load=0.1) == 4  # capped
    assert auto_threads(cores=2, load=1.2) == 1  # other work running: one thread, no spinning
    assert auto_threads(cores=1, load=0.0) == 1
    with pytest.raises(SystemExit, match="--threads"):
        main(["demo", "--threads", "many"])


def test_train_threads_sets_torch_threads(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        args = ["train", "--threads", "1", "data.kind=random", "max_steps=1", f"out_dir={tmp_path}"]
        assert main(args + ["progress=false", "tensorboard=false", "plots=false"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit, match="--threads"):
        main(["train", "--threads", "many", "data.kind=random"])


def test_bench_ops_cpu_quick_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "ops", "--device", "cpu", "--quick", "--rounds", "1", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["environment"]["torch"]
    ops_seen = {row["op"] for row in payload["rows"]}
    assert {
        "ssd",
        "selective_scan",
        "s4d",
        "selective_state_update",
        "causal_conv1d",
        "rms_norm_gated",
    } <= ops_seen
    timed = [row for row in payload["rows"] if row["seconds"] is not None]
    assert all(row["seconds"] > 0 for row in timed)
