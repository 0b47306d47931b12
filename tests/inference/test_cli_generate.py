"""``ssmkit generate`` and ``ssmkit bench generate`` run end to end on tiny models (smoke tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssmkit.cli import main
from ssmkit.inference import generate
from ssmkit.models import LanguageModel, get_preset


def test_generate_from_a_preset_prints_ids_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["generate", "tiny-mamba2", "--ids", "1,2,3", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    )
    captured = capsys.readouterr()
    ids = [int(t) for t in captured.out.strip().split(",")]
    torch.manual_seed(0)
    model = LanguageModel(get_preset("tiny-mamba2")).eval()
    assert ids == generate(model, [1, 2, 3], max_new_tokens=5).sequences[0]
    assert "tokens/s" in captured.err


def test_generate_a_batch_without_streaming(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "tiny-hybrid", "--ids", "1,2,3", "--ids", "4,5", "--max-new-tokens", "4"]
    assert main([*argv, "--device", "cpu", "--temperature", "1", "--seed", "3", "--top-k", "20"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("[0] ") and lines[1].startswith("[1] ")
    assert all(len(line.split(" ", 1)[1].split(",")) == 4 for line in lines)
    assert "decode:" in captured.err and "batch 2" in captured.err


def test_generate_with_a_checkpoint_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssmkit.data.text import CharTokenizer

    torch.manual_seed(0)
    LanguageModel(get_preset("tiny-mamba1")).save_pretrained(tmp_path)
    CharTokenizer.train("abcdefghij klmnop").save(tmp_path)
    assert (
        main(["generate", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out
    # 6 characters (tokens beyond the 17 characters decode to nothing, hence at most 6)
    assert 0 <= len(out.rstrip("\n")) <= 6


def test_generate_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="neither a checkpoint folder nor a preset"):
        main(["generate", "no-such-model", "--ids", "1"])
    with pytest.raises(SystemExit, match="has no tokenizer files: pass token ids with --ids"):
        main(["generate", "tiny-mamba2", "--prompt", "hello", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--ids must be comma-separated integers"):
        main(["generate", "tiny-mamba2", "--ids", "1,x", "--device", "cpu"])


def test_bench_generate_cpu_quick_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    assert (
        main(["bench", "generate", "--device", "cpu", "--quick", "--rounds", "1", "--json", str(path)]) == 0
    )
    rows = json.loads(path.read_text())["rows"]
    timed = [row for row in rows if row["op"] in ("prefill", "decode")]
    assert {row["impl"] for row in timed} == {"tiny-mamba2", "tiny-hybrid", "transformer (tiny-mamba2 shape)"}
    assert len(timed) == 3 * 2 * 2 * 2  # models x batches x prompts x (prefill, decode)
    assert all(row["seconds"] and row["seconds"] > 0 for row in timed)
