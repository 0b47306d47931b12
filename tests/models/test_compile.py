"""torch.compile traces whole models through the operators without graph breaks (fullgraph=True).

On the CPU the graph is run with the ``aot_eager`` backend (no C++ compiler needed); on a GPU the
same test runs with inductor through the Triton custom ops.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import LanguageModel, get_preset
from tests.helpers import assert_close, device_for_tests


@pytest.mark.parametrize("preset", ["tiny-mamba2", "tiny-mamba1"])
def test_fullgraph_compile_matches_eager(preset: str) -> None:
    torch._dynamo.reset()
    device = device_for_tests()
    model = LanguageModel(get_preset(preset)).to(device).eval()
    ids = torch.randint(0, 50, (2, 37), device=device)
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(
            model, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager"
        )
        actual = compiled(ids).logits
    assert_close(actual, expected, torch.float32, scale=10)
