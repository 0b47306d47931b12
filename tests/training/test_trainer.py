"""The loop end to end on the CPU: exact resume, gradient accumulation, bf16 autocast, activation
checkpointing, outputs (JSONL, TensorBoard, plots, tokenizer), golden checkpoint, resume fallback."""

from __future__ import annotations

import pytest
import torch

from ssmkit.training.checkpoint import load_checkpoint
from ssmkit.training.metrics import LOG_FILE, read_log
from ssmkit.training.trainer import Trainer
from tests.training.common import random_stream, small_config
from tests.training.toy import ToyLM

models = pytest.importorskip("ssmkit.models", reason="ssmkit.models does not import yet")


def _tiny_mamba2():
    return models.LanguageModel(models.get_preset("tiny-mamba2"))


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in read_log(out_dir / LOG_FILE) if r["type"] == "step"}


def test_resume_is_bit_identical_on_cpu_fp32(tmp_path):
    """Stop after 3 of 6 steps, resume from the checkpoint: the same losses and weights, bit for bit,
    as the run that was never interrupted (packed batches with document ends, lr schedule, AdamW)."""
    stream = random_stream(eos_id=5, vocab_size=101)
    kwargs = dict(max_steps=6, data__packing=True, model={"preset": "tiny-mamba2"}, schedule__warmup_steps=2)

    torch.manual_seed(0)
    full = Trainer(small_config(tmp_path / "full", **kwargs), model=_tiny_mamba2(), train_stream=stream)
    full.fit()

    torch.manual_seed(0)
    first = Trainer(small_config(tmp_path / "split", **kwargs), model=_tiny_mamba2(), train_stream=stream)
    first.fit(stop_at=3)
    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    second = Trainer(
        small_config(tmp_path / "split", checkpoint__resume="auto", **kwargs),
        model=_tiny_mamba2(),
        train_stream=stream,
    )
    second.fit()

    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(got) == list(range(6))
    assert [got[s] for s in range(6)] == [expected[s] for s in range(6)]  # exact equality
    for (name, a), b in zip(full.inner.state_dict().items(), second.inner.state_dict().values()):
        assert torch.equal(a, b), name
    resumed = [e for e in second.events if e["event"] == "resume"]
    assert resumed and resumed[0]["step"] == 3


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    stream = random_stream()
    torch.manual_seed(0)
    big = Trainer(small_config(tmp_path / "a", data__micro_batch_size=4), model=ToyLM(), train_stream=stream)
    big.fit()
    torch.manual_seed(0)
    accum = Trainer(
        small_config(tmp_path / "b", data__micro_batch_size=2, grad_accum=2),
        model=ToyLM(),
        train_stream=stream,
    )
    accum.fit()
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6)
    for p, q in zip(big.inner.parameters(), accum.inner.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    config = small_config(tmp_path, precision="bf16", max_steps=4, model={"preset": "tiny-mamba2"})
    trainer = Trainer(config, model=_tiny_mamba2(), train_stream=random_stream(vocab_size=101))
    result = trainer.fit()
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert all(p.dtype == torch.float32 for p in trainer.inner.parameters())
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    stream = random_stream(vocab_size=101)
    runs = []
    for flag in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(
            small_config(
                tmp_path / str(flag),
                activation_checkpointing=flag,
                max_steps=2,
                model={"preset": "tiny-mamba2"},
            ),
            model=_tiny_mamba2(),
            train_stream=stream,
        )
        trainer.fit()
        runs.append(trainer)
    for p, q in zip(runs[0].inner.parameters(), runs[1].inner.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_text_run_writes_log_tensorboard_plots_tokenizer_and_golden(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    config = small_config(
        tmp_path / "run",
        data__kind="text",
        data__path=str(text),
        data__val_fraction=0.2,
        tensorboard=True,
        plots=True,
        eval_every=3,
        eval_batches=2,
        checkpoint__every=2,
        checkpoint__keep_last=2,
        max_steps=6,
        model={"preset": "tiny-mamba2"},
        monitor__state_every=3,
        monitor__grad_every=3,
    )
    result = Trainer(config).fit()
    out = tmp_path / "run"
    records = read_log(out / LOG_FILE)
    kinds = {r["type"] for r in records}
    assert {"step", "eval", "event", "grad_report", "state"} <= kinds
    step = next(r for r in records if r["type"] == "step")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_gb", "step_time_s"} <= set(step)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert {p.name for p in (out / "plots").glob("*.png")} == {
        "loss.png",
        "grad_norm.png",
        "lr.png",
        "state_norms.png",
    }
    assert (out / "tokenizer" / "char_tokenizer.json").is_file()
    golden = load_checkpoint(out / "checkpoints" / "golden")
    assert golden.trainer_state["best_val"] == pytest.approx(result.best_val_loss)
    assert (
        golden.metadata["model_config"]["vocab_size"] == len(set(text.read_text()))
        and golden.metadata["parameters"] > 0
    )
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == ["step-00000004", "step-00000006"]


def test_resume_auto_skips_a_corrupted_checkpoint(tmp_path):
    stream = random_stream()
    config = small_config(tmp_path, max_steps=6, checkpoint__every=2, checkpoint__golden="none")
    Trainer(config, model=ToyLM(), train_stream=stream).fit(stop_at=4)
    newest = tmp_path / "checkpoints" / "step-00000004"
    (newest / "optimizer.safetensors").write_bytes(b"garbage")
    resumed = Trainer(
        small_config(tmp_path, max_steps=6, checkpoint__resume="auto", checkpoint__every=2),
        model=ToyLM(),
        train_stream=stream,
    )
    resumed.fit()
    (event,) = [e for e in resumed.events if e["event"] == "resume"]
    assert event["step"] == 2 and event["path"].endswith("step-00000002")
    assert resumed.step == 6


@pytest.mark.slow
def test_torch_compile_trains_the_same(tmp_path):
    stream = random_stream()
    torch.manual_seed(0)
    eager = Trainer(small_config(tmp_path / "eager", max_steps=2), model=ToyLM(), train_stream=stream)
    eager.fit()
    torch.manual_seed(0)
    compiled = Trainer(
        small_config(tmp_path / "compiled", max_steps=2, compile=True), model=ToyLM(), train_stream=stream
    )
    compiled.fit()
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)


def test_memory_mapped_token_file_with_validation_file(tmp_path):
    from ssmkit.data import write_tokens

    write_tokens(tmp_path / "train.npy", random_stream(eos_id=3))
    write_tokens(tmp_path / "val.bin", random_stream(num_tokens=512, seed=1, eos_id=3))
    config = small_config(
        tmp_path / "run",
        data__kind="tokens",
        data__path=str(tmp_path / "train.npy"),
        data__val_path=str(tmp_path / "val.bin"),
        max_steps=3,
        eval_every=2,
        eval_batches=2,
    )
    trainer = Trainer(config, model=ToyLM())
    assert trainer.loader.stream.eos_id == 3 and len(trainer.val_batches) == 2
    result = trainer.fit()
    evals = [r for r in read_log(tmp_path / "run" / LOG_FILE) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and result.best_val_loss == min(r["val_loss"] for r in evals)


def test_max_seconds_stops_with_a_checkpoint_and_counts_train_time(tmp_path):
    """A limit shorter than one step: the run stops after its first step, says why, evaluates and
    saves that step; the seconds spent travel in the checkpoint so a resumed run keeps counting."""
    stream = random_stream()
    config = small_config(tmp_path / "run", max_steps=8, max_seconds=1e-9, checkpoint__every=100)
    trainer = Trainer(config, model=ToyLM(), train_stream=stream)
    result = trainer.fit()
    assert result.step == 1
    limits = [e for e in trainer.events if e["event"] == "time_limit"]
    assert len(limits) == 1 and limits[0]["step"] == 1 and limits[0]["train_seconds"] > 0
    saved = trainer.checkpoints.load_latest()
    assert saved is not None and saved.trainer_state["step"] == 1
    assert saved.trainer_state["train_seconds"] == pytest.approx(trainer.train_seconds)
    assert trainer.train_seconds > 0


def test_max_seconds_must_be_finite_and_not_negative(tmp_path):
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_seconds"):
            small_config(tmp_path, max_seconds=bad)
