"""Production checklist: a model that meets the contract passes every line at tiny sizes; models
broken on purpose fail exactly the line that looks for their defect; the command's exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssmkit.evaluation.checklist import CHECKS, ChecklistConfig, run_checklist, sample
from ssmkit.models import LanguageModel, get_preset

TINY = ChecklistConfig(
    prompt_length=24,
    runs=10,
    calls=10,
    memory_lengths=(256, 2048),
    chunk=128,
    long_length=600,
    large_batch=64,
    batch_prompt_length=8,
    sample_tokens=8,
)


class StrictLanguageModel(LanguageModel):
    """LanguageModel plus the empty-prompt check the checklist asks for (LanguageModel itself lets an
    empty prompt reach the conv kernel, which fails with an internal RuntimeError)."""

    def forward(self, input_ids: torch.Tensor, **kwargs):
        if input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must hold at least one token, got shape {tuple(input_ids.shape)}")
        return super().forward(input_ids, **kwargs)


def _model(preset: str, device: torch.device, cls: type = StrictLanguageModel) -> LanguageModel:
    torch.manual_seed(0)
    return cls(get_preset(preset)).to(device).eval()


@pytest.mark.parametrize("preset", ["tiny-mamba1", "tiny-mamba2"])
def test_a_model_meeting_the_contract_passes_every_line(preset: str, device: torch.device) -> None:
    rebuild = lambda: _model(preset, torch.device("cpu"))
    seen = []
    results = run_checklist(_model(preset, device), TINY, rebuild=rebuild, callback=seen.append)
    assert [r.name for r in results] == list(CHECKS) == [r.name for r in seen]
    failed = {r.name: r.measured for r in results if not r.passed}
    assert not failed, failed
    by_name = {r.name: r for r in results}
    assert by_name["determinism"].details["max_variance"] < 1e-6
    assert by_name["memory_vs_length"].details["reports"][0]["cache_bytes"] > 0
    assert by_name["long_prompt"].details["length"] == 600
    assert "identical" in by_name["same_seed"].measured
    json.dumps([r.to_dict() for r in results])


def test_attention_fails_the_memory_line(device: torch.device) -> None:
    (result,) = run_checklist(_model("tiny-hybrid", device), TINY, only=["memory_vs_length"])
    assert not result.passed and "exponent" in result.measured
    assert result.details["reports"][1]["cache_bytes"] > 4 * result.details["reports"][0]["cache_bytes"]


def test_broken_reset_is_caught(device: torch.device) -> None:
    class LeakyReset(StrictLanguageModel):
        def allocate_cache(self, batch: int, **kwargs):
            cache = super().allocate_cache(batch, **kwargs)
            cache.reset = lambda: setattr(cache, "seqlen_offset", 0)  # forgets to zero the states
            return cache

    (result,) = run_checklist(_model("tiny-mamba1", device, LeakyReset), TINY, only=["reset"])
    assert not result.passed and result.details["state_diff"] > 0


def test_nondeterminism_is_caught(device: torch.device) -> None:
    class Noisy(StrictLanguageModel):
        def forward(self, input_ids, **kwargs):
            out = super().forward(input_ids, **kwargs)
            out.logits = out.logits + torch.randn_like(out.logits)  # unseeded noise
            return out

    results = run_checklist(_model("tiny-s4", device, Noisy), TINY, only=["determinism", "same_seed"])
    assert [r.passed for r in results] == [False, False]
    assert results[0].details["max_variance"] > 1e-6


def test_memory_leak_is_caught(device: torch.device) -> None:
    kept = []

    class Hoarder(StrictLanguageModel):
        def forward(self, input_ids, **kwargs):
            kept.append(torch.ones(1 << 20, device=input_ids.device))  # 4 MiB kept per call
            return super().forward(input_ids, **kwargs)

    config = ChecklistConfig(**{**TINY.__dict__, "leak_tolerance_bytes": 8 * 2**20})
    (result,) = run_checklist(_model("tiny-mamba2", device, Hoarder), config, only=["memory_leak"])
    assert not result.passed and result.details["after"] - result.details["before"] > 8 * 2**20


@pytest.mark.parametrize(
    ("raised", "passed"),
    [(ValueError("input_ids is empty"), True), (RuntimeError("kernel size"), False), (None, False)],
)
def test_empty_prompt_line(raised: Exception | None, passed: bool, device: torch.device) -> None:
    class Model(LanguageModel):
        def forward(self, input_ids, **kwargs):
            if input_ids.shape[1] == 0:
                if raised is not None:
                    raise raised
                return super().forward(torch.zeros(1, 1, dtype=torch.long, device=input_ids.device))
            return super().forward(input_ids, **kwargs)

    (result,) = run_checklist(_model("tiny-mamba1", device, Model), TINY, only=["empty_prompt"])
    assert result.passed is passed
    assert (type(raised).__name__ if raised else "no error") in result.measured


def test_a_crashing_check_is_a_failed_line(device: torch.device) -> None:
    class NoBatch(StrictLanguageModel):
        def forward(self, input_ids, **kwargs):
            if input_ids.shape[0] > 1:
                raise RuntimeError("batching is broken")
            return super().forward(input_ids, **kwargs)

    (result,) = run_checklist(_model("tiny-mamba1", device, NoBatch), TINY, only=["batch_1_and_64"])
    assert not result.passed and "RuntimeError: batching is broken" in result.measured
    with pytest.raises(ValueError, match="unknown checks"):
        run_checklist(_model("tiny-mamba1", device), TINY, only=["speed"])


def test_sampling_depends_on_the_seed_only(device: torch.device) -> None:
    model = _model("tiny-mamba2", device)
    prompt = torch.randint(0, 101, (2, 5), device=device)
    with torch.no_grad():
        a, b, c = (sample(model, prompt, 12, seed) for seed in (1, 1, 2))
    assert a.shape == (2, 12) and torch.equal(a, b) and not torch.equal(a, c)


def test_check_command_exit_status(tmp_path: Path) -> None:
    from ssmkit.cli import main

    out = tmp_path / "check.json"
    passing = ["--only", "reset,one_token,same_seed", "--device", "cpu", "--json", str(out)]
    assert main(["check", "tiny-mamba1", *passing]) == 0
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["checks"]] == ["reset", "one_token", "same_seed"]
    assert all(c["passed"] for c in data["checks"])
    assert "rebuilt weights identical" in data["checks"][2]["measured"]
    failing = ["--only", "memory_vs_length", "--memory-lengths", "256,2048", "--device", "cpu"]
    assert main(["check", "tiny-hybrid", *failing]) == 1
    with pytest.raises(SystemExit, match="unknown checks"):
        main(["check", "tiny-mamba1", "--only", "speed"])
