"""Backend resolution: per-call argument > ``with backend(...)`` > SSMKIT_BACKEND > auto."""

from __future__ import annotations

import pytest
import torch

from ssmkit.ops import backend, current_backend, dispatch

CPU = torch.device("cpu")


def test_auto_on_cpu_is_torch() -> None:
    assert dispatch.resolve("ssmkit.ops.ssd", None, CPU) == "torch"
    assert dispatch.resolve("ssmkit.ops.ssd", "auto", CPU) == "torch"


def test_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSMKIT_BACKEND", "reference")
    assert current_backend() == "reference"
    assert dispatch.resolve("ssmkit.ops.ssd", None, CPU) == "reference"
    with backend("torch"):
        assert current_backend() == "torch"
        with backend("reference"):
            assert dispatch.resolve("ssmkit.ops.ssd", None, CPU) == "reference"
        assert dispatch.resolve("ssmkit.ops.ssd", None, CPU) == "torch"
        # the per-call argument wins over the block
        assert dispatch.resolve("ssmkit.ops.ssd", "reference", CPU) == "reference"
    assert current_backend() == "reference"


def test_bad_names_are_named() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve("ssmkit.ops.ssd", "cuda", CPU)
    with pytest.raises(ValueError, match="backend must be one of"), backend("fast"):  # type: ignore[arg-type]
        pass


def test_bad_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSMKIT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SSMKIT_BACKEND must be one of"):
        current_backend()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not dispatch.triton_importable():
        with pytest.raises(RuntimeError, match="not installed"):
            dispatch.resolve("ssmkit.ops.norm", "triton", CPU)
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((RuntimeError, NotImplementedError), match="TRITON_INTERPRET|no Triton kernels"):
        dispatch.resolve("ssmkit.ops.norm", "triton", CPU)


def test_operator_without_kernels_refuses_triton() -> None:
    if not dispatch.triton_importable():
        pytest.skip("triton is not installed")
    with pytest.raises(NotImplementedError, match="no Triton kernels"):
        dispatch.resolve("ssmkit.ops.s4", "triton", CPU)
