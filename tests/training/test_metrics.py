"""Metrics outputs, FLOP estimates, and the throughput benchmark's plumbing (on a tiny preset)."""

from __future__ import annotations

import builtins
import json
import math

import pytest

from ssmkit.training.flops import flops_per_token, mixer_flops_per_token, peak_flops
from ssmkit.training.metrics import LOG_FILE, MetricsWriter, make_plots, read_log
from tests.training.toy import ToyLM


def test_writer_jsonl_nan_safe_and_disabled_rank(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, progress=False)
    writer.step({"step": 0, "iter": 0, "loss": float("nan"), "lr": 1e-3, "grad_norm": 1.0})
    writer.event({"event": "skipped_step", "reason": "nan_loss"})
    writer.close()
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert json.loads(lines[0])["loss"] == "nan" and json.loads(lines[1])["event"] == "skipped_step"
    silent = MetricsWriter(tmp_path / "rank1", enabled=False)
    silent.step({"step": 0, "loss": 1.0})
    silent.close()
    assert not (tmp_path / "rank1").exists()


def test_missing_tensorboard_is_a_logged_warning(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    writer = MetricsWriter(tmp_path, tensorboard=True, progress=False)
    writer.close()
    assert "TensorBoard scalars are skipped" in caplog.text
    assert read_log(tmp_path / LOG_FILE)[0]["event"] == "tensorboard_unavailable"


def test_plots_have_labelled_axes(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, progress=False)
    for step in range(5):
        writer.step({"step": step, "iter": step, "loss": 3.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 0.5})
    writer.eval(4, {"val_loss": 2.7})
    writer.report("state", {"step": 4, "layers": {0: {"mean": 1.0, "max": 2.0}}})
    writer.close()
    with open(tmp_path / LOG_FILE, "a") as f:
        f.write('{"type": "step", "ste')  # a half-written line from a crash is ignored
    written = make_plots(tmp_path / LOG_FILE, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["grad_norm.png", "loss.png", "lr.png", "state_norms.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_flops_estimate():
    toy = ToyLM(vocab_size=32, d_model=16)
    untied_non_embedding = sum(p.numel() for n, p in toy.named_parameters() if n != "embedding.weight")
    assert flops_per_token(toy, 128) == 6 * untied_non_embedding
    models = pytest.importorskip("ssmkit.models")
    config = models.get_preset("mamba2-130m")
    h, p, n = config.mamba2_nheads, config.mamba2.headdim, config.mamba2.d_state
    assert mixer_flops_per_token(config, 2048) == 24 * 3 * (256 * 1 * n + 256 * h * p + 4 * h * p * n)
    attention = models.ModelConfig(
        d_model=64,
        n_layer=2,
        vocab_size=10,
        layer_types=["attention"] * 2,
        attention=models.AttentionConfig(num_heads=4),
    )
    assert mixer_flops_per_token(attention, 100) == 2 * 3 * 2 * 64 * 100
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12 and peak_flops("cpu") is None


def test_bench_runs_the_same_loop_on_a_tiny_preset(tmp_path, capsys):
    pytest.importorskip("ssmkit.models")
    from ssmkit.training import bench

    section = bench.transformer_like("tiny-mamba2")
    assert set(section["layer_types"]) == {"attention"} and section["mlp"]["d_intermediate"] > 0
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--presets",
            "tiny-mamba2",
            "--seqlen",
            "32",
            "--tokens",
            "64",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
            "device=cpu",
            "precision=fp32",
        ]
    )
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["tiny-mamba2", "transformer ~tiny-mamba2"]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"]) for r in rows)
    assert "training throughput" in capsys.readouterr().out
