"""`ssmkit compare`: finds the layer and stage of a deliberately corrupted weight, full and token by token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ssmkit.evaluation.compare import (
    compare_checkpoint,
    compare_stages,
    load_dump,
    load_transformers_model,
    run_transformers,
    save_dump,
)
from tests.hf_checkpoints import granite_config, mamba2_config, mamba_config, random_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is the reference model")

# One group in the Mamba-2 layers: some transformers releases normalise the gated RMSNorm over all
# groups at once; tests/models/test_hf.py covers groups > 1 against the releases that do not.
CONFIGS = {
    "mamba": lambda: mamba_config(vocab_size=64, num_hidden_layers=3, use_bias=False),
    "mamba2": lambda: mamba2_config(vocab_size=64, num_hidden_layers=3),
    "granite": lambda: granite_config(
        vocab_size=64, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False
    ),
}
IDS = torch.tensor([[3, 17, 5, 60, 22, 9, 41, 8, 33, 2, 12]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        random_checkpoint(make(), folder)  # perturbed from the global RNG, right after the init
        out[name] = folder
    return out


def _corrupt(source: Path, target: Path, tensor: str, index: tuple[int, ...], delta: float = 0.5) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors[tensor][index] += delta
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("token_by_token", [False, True], ids=["full", "tokens"])
def test_clean_checkpoint_has_no_divergence(name, token_by_token, folders):
    report = compare_checkpoint(folders[name], IDS, token_by_token=token_by_token)
    assert report.first_divergence is None, report.first_divergence
    stages = {row.stage for row in report.rows}
    expected = {
        "embedding",
        "in_norm",
        "in_proj",
        "conv1d",
        "x",
        "B",
        "C",
        "dt",
        "ssm_out",
        "gate",
        "out_proj",
        "residual",
        "final_norm",
        "logits",
    }
    assert expected <= stages, expected - stages
    if name == "granite":
        assert {"q", "k", "v", "attn_out", "norm", "mlp_norm", "mlp", "mlp_residual"} <= stages
    assert max(row.max_rel for row in report.rows) < 1e-4


# (checkpoint, tensor, index, layer, stage): the first stage downstream of the weight. Weights that
# act through dt move by 3: with dt ~ 0.01 the state adds little to the D * x skip within 11 tokens,
# so a smaller change stays under the tolerance until the gated norm amplifies it.
CORRUPTIONS = [
    ("mamba", "backbone.layers.1.mixer.dt_proj.weight", (5, 1), 1, "dt"),
    ("mamba", "backbone.layers.2.mixer.conv1d.weight", (3, 0, 3), 2, "conv1d"),
    ("mamba2", "backbone.layers.1.mixer.conv1d.weight", (5, 0, 2), 1, "conv1d"),
    ("mamba2", "backbone.layers.0.mixer.in_proj.weight", (7, 4), 0, "in_proj"),
    ("mamba2", "backbone.layers.1.mixer.dt_bias", (2,), 1, "ssm_out"),
    ("granite", "model.layers.1.self_attn.k_proj.weight", (3, 2), 1, "k"),
    ("granite", "model.layers.0.mamba.norm.weight", (11,), 0, "norm"),
    ("granite", "model.layers.2.shared_mlp.output_linear.weight", (4, 6), 2, "mlp"),
]


@pytest.mark.parametrize(
    "name,tensor,index,layer,stage",
    CORRUPTIONS,
    ids=[f"{c[0]}-{c[1].split('.', 2)[-1]}" for c in CORRUPTIONS],
)
def test_corrupted_weight_is_found(name, tensor, index, layer, stage, folders, tmp_path):
    corrupted = _corrupt(
        folders[name], tmp_path / "bad", tensor, index, 3.0 if tensor.endswith("dt_bias") else 0.5
    )
    report = compare_checkpoint(corrupted, IDS, reference_path=folders[name])
    first = report.first_divergence
    assert first is not None and (first.layer, first.stage) == (layer, stage), first
    # every stage before it agrees
    before = report.rows[: report.rows.index(first)]
    assert before and all(not row.diverged for row in before)


def test_corruption_is_found_token_by_token(folders, tmp_path):
    corrupted = _corrupt(
        folders["granite"], tmp_path / "bad", "model.layers.2.mamba.conv1d.weight", (9, 0, 1)
    )
    report = compare_checkpoint(corrupted, IDS, reference_path=folders["granite"], token_by_token=True)
    assert (report.first_divergence.layer, report.first_divergence.stage) == (2, "conv1d")
    assert len(report.first_divergence.per_token_max_abs) == IDS.shape[1]


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_reference_dump_round_trip(suffix, folders, tmp_path):
    hf_model, model_type = load_transformers_model(folders["mamba2"])
    stages = run_transformers(hf_model, model_type, IDS)
    save_dump(stages, tmp_path / f"ref{suffix}", input_ids=IDS)
    loaded, ids = load_dump(tmp_path / f"ref{suffix}")
    assert ids.tolist() == IDS.tolist()
    assert compare_stages(loaded, stages, tolerance=1e-12).first_divergence is None
    report = compare_checkpoint(folders["mamba2"], IDS, reference=str(tmp_path / f"ref{suffix}"))
    assert report.first_divergence is None and len(report.rows) == len(stages)


def test_cli_prints_the_first_divergence_and_writes_json(folders, tmp_path, capsys):
    from ssmkit.cli import main

    corrupted = _corrupt(folders["mamba2"], tmp_path / "bad", "backbone.layers.1.mixer.conv1d.bias", (2,))
    rc = main(
        [
            "compare",
            str(corrupted),
            "--ids",
            ",".join(map(str, IDS[0].tolist())),
            "--reference-checkpoint",
            str(folders["mamba2"]),
            "--json",
            str(tmp_path / "table.json"),
        ]
    )
    assert rc == 1
    printed = capsys.readouterr().out
    assert "first divergence: layer 1, stage conv1d" in printed
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["first_divergence"]["layer"] == 1 and table["first_divergence"]["stage"] == "conv1d"
    assert all(len(row["per_token_max_abs"]) == IDS.shape[1] for row in table["rows"])

    assert main(["compare", str(folders["mamba2"]), "--ids", "1,2,3", "--tokens"]) == 0
    assert "no stage diverges" in capsys.readouterr().out
