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


def test_demo_runs_every_operator(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long cells in a narrow captured terminal
    assert main(["demo", "--seqlen", "64"]) == 0
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
