"""Shared test helpers: tolerances per dtype, relative-error comparison, device choice."""

from __future__ import annotations

import torch

# Relative error ||a - b|| / ||b|| allowed per compute dtype of the inputs.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, name: str = "output"
) -> None:
    """Compare by normwise relative error with the tolerance of ``dtype`` (times ``scale``)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    tol = REL_TOL[dtype] * scale
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def device_for_tests() -> torch.device:
    """CUDA when available (the same tests run on the GPU machine), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params(op_package: str) -> list:
    """``pytest.param`` entries for every fast backend of an operator: ``"torch"`` always, and
    ``"triton"`` when its kernels exist and can run here (CUDA, or the CPU interpreter that
    ``tests/conftest.py`` switches on when no GPU is present); otherwise skipped with a reason."""
    import importlib.util

    import pytest

    from ssmkit.ops import dispatch

    params = [pytest.param("torch", id="torch")]
    reason = None
    if not dispatch.triton_importable():
        reason = "triton is not installed"
    elif importlib.util.find_spec(f"{op_package}.triton") is None:
        reason = f"{op_package} has no Triton kernels yet"
    elif not torch.cuda.is_available() and not dispatch.triton_interpret():
        reason = "no CUDA device and TRITON_INTERPRET is not 1"
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    params.append(pytest.param("triton", id="triton", marks=marks))
    return params


def on_interpreter(backend: str) -> bool:
    """True when ``backend`` runs Triton kernels through the (slow) CPU interpreter: tests then
    pick their small shapes."""
    return backend == "triton" and not torch.cuda.is_available()
