"""TrainConfig: YAML, key=value overrides with type conversion, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ssmkit.training.config import TrainConfig, apply_overrides, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny-mamba2", "d_model": 32},
                "data": {"path": "x.txt", "seq_len": 64},
                "optim": {"lr": "3e-4", "groups": [{"name": "ssm", "params": ["*.mixer.*"], "lr_mult": 0.5}]},
            }
        )
    )
    config = load_config(
        path,
        [
            "optim.lr=1e-3",
            "data.packing=false",
            "max_steps=10",
            "optim.betas=[0.9,0.99]",
            "model.mamba2.headdim=8",
            "checkpoint.resume=null",
            "peak_flops=1e12",
        ],
    )
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)
    assert config.data.packing is False and config.data.seq_len == 64 and config.max_steps == 10
    assert config.optim.betas == (0.9, 0.99)
    assert config.model == {"preset": "tiny-mamba2", "d_model": 32, "mamba2": {"headdim": 8}}
    assert config.optim.groups[0]["lr_mult"] == 0.5
    assert config.checkpoint.resume is None and config.peak_flops == 1e12


def test_round_trip_through_yaml():
    config = load_config(None, ["data.kind=random", "optim.lr=2e-3", "guard.max_bad_steps=5"])
    again = TrainConfig.from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"unknown config keys \['optim.lrr'\]"),
        ("max_steps=abc", "max_steps must be an integer, got 'abc'"),
        ("max_steps=1.5", "max_steps must be an integer"),
        ("data.packing=maybe", "data.packing must be true or false"),
        ("precision=fp8", r"precision must be one of \('fp32', 'bf16'\), got 'fp8'"),
        ("max_steps=0", "max_steps must be >= 1, got 0"),
        ("optim.lr", "override must look like key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.kind=random", override])


def test_validation_of_combinations():
    with pytest.raises(ValueError, match="data.path is required"):
        load_config(None, ["data.kind=text"])
    with pytest.raises(ValueError, match="state_penalty needs data.packing=false"):
        load_config(None, ["data.kind=random", "monitor.state_penalty=0.1"])
    with pytest.raises(ValueError, match="section"):
        apply_overrides({"max_steps": 3}, ["max_steps.x=1"])


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "configs" / "train").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_configs_parse(path):
    overrides = ["data.path=corpus.txt"] if "kind: text" in path.read_text() else []
    config = load_config(path, overrides)
    assert config.model.get("preset")
