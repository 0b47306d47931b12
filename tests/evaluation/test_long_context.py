"""Long-context streaming: loss agrees with the perplexity code, state norms and drift, memory
verdicts (SSM flat, attention not), context-shift detection and reset, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssmkit.commands.eval import parse_lengths
from ssmkit.evaluation.long_context import (
    ContextShiftDetector,
    LengthReport,
    cycle_tokens,
    memory_is_flat,
    run_long_context,
    stream,
    synthetic_tokens,
)
from ssmkit.evaluation.perplexity import streaming_nll
from ssmkit.models import LanguageModel, get_preset


def _model(preset: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(get_preset(preset)).to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("preset", ["tiny-mamba1", "tiny-mamba2", "tiny-s4", "tiny-hybrid"])
def test_stream_loss_matches_perplexity_and_reports_states(preset: str, device: torch.device) -> None:
    model = _model(preset, device, torch.float64)
    tokens = synthetic_tokens(301, 101, seed=2)
    report = stream(model, tokens, chunk=64, shift_threshold=None)
    nll, count = streaming_nll(model, tokens[0], chunk=37)
    assert report.tokens_scored == count == 300
    assert abs(report.loss - nll / count) <= 1e-10 * (nll / count)
    assert report.finite and report.perplexity == pytest.approx(math.exp(report.loss))
    ssm_layers = [i for i, kind in enumerate(model.config.layer_types) if kind != "attention"]
    assert [layer.layer for layer in report.layers] == ssm_layers
    for layer in report.layers:
        assert 0 < layer.mean <= layer.max and math.isfinite(layer.drift_max)
        assert 0 <= layer.drift_last <= layer.drift_max


def test_drift_is_the_relative_change_of_the_mean_norm_between_chunks(device: torch.device) -> None:
    """Recompute the per-chunk mean state norm by hand and compare the drift statistics."""
    from ssmkit.training.state_monitor import unit_norms

    model = _model("tiny-mamba1", device)
    tokens = synthetic_tokens(160, 101, seed=5).to(device)
    report = stream(model, tokens, chunk=32, shift_threshold=None)
    cache = model.allocate_cache(1)
    means = []
    with torch.no_grad():
        for start in range(0, 160, 32):
            model(tokens[:, start : start + 32], cache=cache)
            means.append(unit_norms(cache.states[0].ssm).mean().item())
    drifts = [abs(b - a) / a for a, b in zip(means, means[1:])]
    layer0 = report.layers[0]
    assert layer0.drift_max == pytest.approx(max(drifts), rel=1e-5)
    assert layer0.drift_last == pytest.approx(drifts[-1], rel=1e-5)
    assert layer0.mean == pytest.approx(sum(means) / len(means), rel=1e-5)


def test_memory_verdict_ssm_flat_attention_grows(device: torch.device) -> None:
    lengths = [256, 1024]
    verdicts = {}
    for preset in ("tiny-mamba2", "tiny-hybrid"):
        model = _model(preset, device)
        results = run_long_context(
            model, lambda n: synthetic_tokens(n, 101), lengths=lengths, chunk=128, shift_threshold=None
        )
        verdicts[preset] = results["memory"]
        caches = [r["cache_bytes"] for r in results["reports"]]
        if preset == "tiny-mamba2":
            assert caches[0] == caches[1] > 0
        else:  # the attention layer's keys and values grow with the length
            assert caches[1] > 3 * caches[0]
    assert verdicts["tiny-mamba2"]["flat"] and verdicts["tiny-mamba2"]["cache_growth"] == 1.0
    assert not verdicts["tiny-hybrid"]["flat"]


def test_memory_is_flat_thresholds() -> None:
    def report(length: int, peak: int, cache: int) -> LengthReport:
        return LengthReport(length, 512, length - 1, 1.0, math.e, 1.0, 1.0, peak, cache)

    assert memory_is_flat([report(1024, 1000, 10), report(8192, 1090, 10)])["flat"]
    assert not memory_is_flat([report(1024, 1000, 10), report(8192, 1200, 10)])["flat"]
    assert memory_is_flat([report(1024, 1000, 10), report(8192, 1200, 10)], slack_bytes=200)["flat"]
    assert not memory_is_flat([report(1024, 1000, 10), report(8192, 1000, 11)])["flat"]
    with pytest.raises(ValueError, match="at least 2 lengths"):
        memory_is_flat([report(1024, 1000, 10)])


def test_context_shift_detector() -> None:
    detector = ContextShiftDetector(0.8)
    a, b = torch.tensor([1.0, 0.0, 0.1]), torch.tensor([0.0, 1.0, 0.0])
    assert detector.update(a) == (None, False)
    cosine, shifted = detector.update(a * 3)
    assert cosine == pytest.approx(1.0) and not shifted
    cosine, shifted = detector.update(b)
    assert cosine < 0.8 and shifted
    with pytest.raises(ValueError, match="threshold"):
        ContextShiftDetector(1.5)


def _two_topics(device: torch.device) -> torch.Tensor:
    """1024 tokens drawn from ids 0..19, then 1024 from ids 60..79: an abrupt change of context."""
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 20, (1, 1024), generator=g)
    second = torch.randint(60, 80, (1, 1024), generator=g)
    return torch.cat([first, second], dim=1).to(device)


def test_context_shift_is_detected_at_the_boundary_and_resets(
    device: torch.device, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model("tiny-mamba2", device)
    tokens = _two_topics(device)
    plain = stream(model, tokens, chunk=256, shift_threshold=0.8)
    assert [s["position"] for s in plain.shifts] == [1024]
    assert plain.shifts[0]["cosine"] < 0.8 and plain.shifts[0]["reset"] is False
    homogeneous = stream(model, tokens[:, :1024], chunk=256, shift_threshold=0.8)
    assert homogeneous.shifts == []
    with caplog.at_level("WARNING", logger="ssmkit.evaluation.long_context"):
        reset = stream(model, tokens, chunk=256, shift_threshold=0.8, reset_on_shift=True)
    assert [s["position"] for s in reset.shifts] == [1024] and reset.shifts[0]["reset"] is True
    assert any(
        "context shift at token 1024" in r.message and "state reset" in r.message for r in caplog.records
    )
    # After the reset the rest of the stream is scored from a fresh state: the loss changes.
    assert reset.loss != plain.loss


def test_stream_input_errors(device: torch.device) -> None:
    model = _model("tiny-s4", device)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        stream(model, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        stream(model, torch.zeros(1, 10, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match="empty"):
        cycle_tokens(torch.zeros(0, dtype=torch.long), 5)
    assert cycle_tokens(torch.tensor([1, 2, 3]), 7).tolist() == [[1, 2, 3, 1, 2, 3, 1]]


def test_parse_lengths() -> None:
    assert parse_lengths("1k, 4K,1M,300") == [1024, 4096, 1 << 20, 300]
    with pytest.raises(SystemExit, match="k/M"):
        parse_lengths("1g")


def test_long_context_command(tmp_path: Path) -> None:
    from ssmkit.cli import main

    out = tmp_path / "lc"
    code = main(
        [
            "eval",
            "long-context",
            "tiny-mamba1",
            "--lengths",
            "256,1k",
            "--chunk",
            "128",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["length"] for r in results["reports"]] == [256, 1024] and results["memory"]["flat"]
    assert (out / "long_context.png").stat().st_size > 1000
    # A hybrid's attention cache grows: the command says so through its exit status.
    assert (
        main(
            [
                "eval",
                "long-context",
                "tiny-hybrid",
                "--lengths",
                "256,1k",
                "--chunk",
                "128",
                "--out",
                str(out),
            ]
        )
        == 1
    )
