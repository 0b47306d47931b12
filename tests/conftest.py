"""Pytest fixtures shared by every test (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run through Triton's CPU interpreter. The flag is read when a kernel
# is decorated, so it must be set before any ssmkit Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import device_for_tests  # noqa: E402

# Keep CI's two cores busy without oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def device() -> torch.device:
    return device_for_tests()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
