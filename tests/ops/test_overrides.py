"""Launch-configuration overrides (benchmark sweeps) and the eager/custom-op choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ssmkit.ops.common.eager import EagerAutograd, compiling, op_or_impl
from ssmkit.ops.common.overrides import ConfigOverrides


@dataclasses.dataclass(frozen=True)
class _Config:
    block: int = 16
    warps: int = 4


def test_overrides_apply_inside_the_block_only_and_nest():
    overrides = ConfigOverrides(("fwd", "bwd"))
    base = _Config()
    with overrides.forced("fwd", block=64):
        assert overrides.apply("fwd", base) == _Config(64, 4)
        assert overrides.apply("bwd", base) == base
        with overrides.forced("fwd", warps=8):
            assert overrides.apply("fwd", base) == _Config(64, 8)
        assert overrides.apply("fwd", base) == _Config(64, 4)
    assert overrides.apply("fwd", base) == base
    assert overrides.fields("fwd") == {}


def test_overrides_reject_unknown_stage():
    with pytest.raises(ValueError, match="stage must be one of"):
        with ConfigOverrides(("fwd",)).forced("bogus", block=1):
            pass


def test_ssd_tiles_take_stage_overrides():
    from ssmkit.ops.ssd.triton import config

    cpu = torch.device("cpu")
    base = config.tiles_for(cpu, 64, "chunk_scan")
    with config.forced("chunk_scan", num_warps=8):
        assert config.tiles_for(cpu, 64, "chunk_scan").num_warps == 8
        assert config.tiles_for(cpu, 64, "bmm") == config.tiles_for(cpu, 64)
    assert config.tiles_for(cpu, 64, "chunk_scan") == base


def test_plain_tensors_run_the_implementation_traced_ones_the_op():
    calls = []
    op = lambda t: calls.append("op") or t
    impl = lambda t: calls.append("impl") or t
    op_or_impl(op, impl)(torch.ones(2))
    assert calls == ["impl"] and not compiling((torch.ones(2),))
    with FakeTensorMode():
        fake = torch.ones(2)
        assert compiling((fake,))
        op_or_impl(op, impl)(fake)
    assert calls == ["impl", "op"]


def test_eager_autograd_matches_autograd_and_skips_the_function_without_grad():
    def forward(x, scale):
        return x * scale, x.detach().sum()

    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    def backward(ctx, grad, _grad_aux):
        return grad * ctx.scale, None

    eager = EagerAutograd(forward, setup_context, backward, non_differentiable=(1,))
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out, aux = eager(None, x, 3.0)
    assert out.grad_fn is not None and not aux.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 3.0))
    with torch.no_grad():
        out, _ = eager(None, x, 3.0)
    assert out.grad_fn is None
