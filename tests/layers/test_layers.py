"""Layers: fast paths vs the fp64 reference (forward and gradients), initialisation, decode state,
packed sequences, residual dtype."""

from __future__ import annotations

import math

import pytest
import torch

from ssmkit import ops
from ssmkit.layers import Attention, Block, GatedMLP, Mamba1Mixer, Mamba2Mixer, MixtureOfExperts
from ssmkit.layers.s4 import S4DLayer
from ssmkit.layers.tracing import record, tracing
from tests.helpers import assert_close, backend_params

# Odd sizes: d_inner 72 = 3 heads of 24; d_state 13; groups 1 and 3.
MIXERS = {
    "mamba1": lambda: Mamba1Mixer(37, d_state=13, d_conv=4, expand=2),
    "mamba2-g1": lambda: Mamba2Mixer(36, d_state=13, headdim=24, ngroups=1, chunk_size=8),
    "mamba2-g3": lambda: Mamba2Mixer(36, d_state=13, headdim=24, ngroups=3, chunk_size=8),
    "mamba2-dt-limit": lambda: Mamba2Mixer(
        36, d_state=13, headdim=24, ngroups=3, chunk_size=8, dt_limit=(0.002, 0.05)
    ),
    "attention-rope": lambda: Attention(36, num_heads=6, num_kv_heads=2, head_dim=6, rotary_dim=6),
    "attention-nope": lambda: Attention(
        36, num_heads=3, num_kv_heads=3, head_dim=12, rotary_dim=0, softmax_scale=0.2
    ),
    "s4-real": lambda: S4DLayer(36, d_state=13),
    "s4-lin": lambda: S4DLayer(36, d_state=12, init="lin"),
}
SEQLEN = 19  # not a multiple of the chunk size (8)


def fp64_scale(device: torch.device, cpu: float = 100.0) -> float:
    """Tolerance multiplier for fp64 comparisons. On CUDA the Mamba-2 SSD Triton kernel computes fp64
    inputs with fp32-level accuracy, so there fp64 results are held to 1.5e-6 (outputs; 1.3e-7
    measured on an H100) and 3e-6 (parameter gradients, which sum over every position: d(D) measured
    2.3e-6); on the CPU every path is fp64 throughout."""
    return 1.5e4 if device.type == "cuda" else cpu


def _perturb(module: torch.nn.Module) -> None:
    """Random weights everywhere (init leaves some at exactly 1 or 0, which would hide bugs)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("A_log", "log_dt", "dt_bias", "dt_proj.bias")):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.add_(0.2 * torch.randn_like(p))


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"]
)
def test_mixer_fast_path_matches_fp64_reference(name, dtype, device):
    torch.manual_seed(0)
    layer = MIXERS[name]().to(device)
    _perturb(layer)
    x = torch.randn(2, SEQLEN, 37 if name == "mamba1" else 36, device=device)
    grad_out = torch.randn(2, SEQLEN, x.shape[-1], device=device)

    ref_layer = MIXERS[name]().to(device).double()
    ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x_ref = x.double().requires_grad_(True)
    with ops.backend("reference"):
        y_ref = ref_layer(x_ref)
    (y_ref * grad_out.double()).sum().backward()

    layer = layer.to(dtype)
    x_fast = x.to(dtype).requires_grad_(True)
    with ops.backend("auto"):
        y = layer(x_fast)
    (y * grad_out.to(dtype)).sum().backward()
    # bf16 rounds weights and activations at every projection: allow a few bf16 ulps of drift.
    scale = 3.0 if dtype == torch.bfloat16 else (20.0 if dtype == torch.float32 else fp64_scale(device, 10.0))
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, scale=scale, name=f"{name} output")
    assert_close(x_fast.grad, x_ref.grad, dtype, scale=scale, name=f"{name} d(input)")
    ref_params = dict(ref_layer.named_parameters())
    for pname, p in layer.named_parameters():
        if dtype == torch.bfloat16 and name == "mamba2-dt-limit" and pname == "dt_bias":
            # bf16 rounding moves steps across the clamp edges, where the gradient jumps to zero.
            continue
        # Parameter gradients sum bf16 products over every position: allow more drift than for outputs.
        param_scale = 10.0 if dtype == torch.bfloat16 else scale * 2
        assert_close(p.grad, ref_params[pname].grad, dtype, scale=param_scale, name=f"{name} d({pname})")


@pytest.mark.parametrize(
    "name", ["mamba1", "mamba2-g3", "mamba2-dt-limit", "attention-rope", "s4-real", "s4-lin"]
)
def test_decode_state_matches_full_forward(name, device):
    """Prefill 7 tokens with a state, then one token per call (decode kernels): same outputs."""
    torch.manual_seed(0)
    layer = MIXERS[name]().to(device).double()
    _perturb(layer)
    x = torch.randn(2, 13, 37 if name == "mamba1" else 36, device=device, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        state = layer.allocate_state(2, dtype=torch.float64, device=device)
        pieces = [layer(x[:, :7], state=state)]
        pieces += [layer(x[:, t : t + 1], state=state, decode=True) for t in range(7, 13)]
    assert_close(
        torch.cat(pieces, dim=1), full, torch.float64, scale=fp64_scale(device), name=f"{name} decode"
    )


@pytest.mark.parametrize("name", ["mamba1", "mamba2-g3", "attention-rope", "s4-real"])
def test_packed_sequences_match_separate_calls(name, device):
    torch.manual_seed(0)
    layer = MIXERS[name]().to(device).double()
    _perturb(layer)
    d = 37 if name == "mamba1" else 36
    lengths = [5, 1, 11]
    xs = [torch.randn(1, n, d, device=device, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(lengths, device=device))[
        None
    ]
    with torch.no_grad():
        packed = layer(torch.cat(xs, dim=1), seq_idx=seq_idx.to(torch.int32), cu_seqlens=cu)
        separate = torch.cat([layer(x) for x in xs], dim=1)
    assert_close(packed, separate, torch.float64, scale=fp64_scale(device), name=f"{name} packed")


def test_mamba1_initialisation():
    torch.manual_seed(0)
    layer = Mamba1Mixer(37, d_state=13, dt_min=0.002, dt_max=0.05)
    assert torch.allclose(layer.A_log, torch.log(torch.arange(1, 14.0)).expand(74, 13))
    assert torch.equal(layer.D, torch.ones(74))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    # log-uniform: the log of dt is spread over the whole range, not bunched at one end
    log_dt = dt.log()
    assert log_dt.mean().item() == pytest.approx((math.log(0.002) + math.log(0.05)) / 2, abs=0.5)
    bound = layer.dt_rank**-0.5
    assert layer.dt_proj.weight.abs().max() <= bound


def test_mamba2_initialisation():
    torch.manual_seed(0)
    layer = Mamba2Mixer(36, d_state=13, headdim=24, ngroups=3)
    assert torch.allclose(layer.A_log, torch.log(torch.arange(1, 4.0)))
    assert torch.equal(layer.D, torch.ones(3))
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert layer.in_proj.out_features == 2 * 72 + 2 * 3 * 13 + 3
    assert layer.conv1d.weight.shape == (72 + 2 * 3 * 13, 1, 4)


def test_mamba2_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"expand \* d_model \(74\) must be divisible by headdim \(24\)"):
        Mamba2Mixer(37, headdim=24)
    with pytest.raises(ValueError, match=r"nheads \(3\) must be divisible by ngroups \(2\)"):
        Mamba2Mixer(36, headdim=24, ngroups=2)


def test_decode_rejects_several_tokens():
    layer = Mamba2Mixer(36, d_state=5, headdim=24)
    state = layer.allocate_state(1, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"one token per call, got hidden of shape \(1, 2, 36\)"):
        layer(torch.randn(1, 2, 36), state=state, decode=True)


def test_gated_mlp_and_experts_match_a_dense_formula():
    torch.manual_seed(0)
    mlp = GatedMLP(10, 7)
    x = torch.randn(3, 4, 10)
    gate, value = (x @ mlp.fc1.weight.T).chunk(2, dim=-1)
    assert_close(mlp(x), (torch.nn.functional.silu(gate) * value) @ mlp.fc2.weight.T, torch.float32)

    moe = MixtureOfExperts(10, 6, num_experts=5, top_k=2).double()
    x = x.double()
    logits = x @ moe.router.T
    expected = torch.zeros_like(x)
    weights = torch.softmax(logits.topk(2, dim=-1).values, dim=-1)
    index = logits.topk(2, dim=-1).indices
    for e in range(5):
        g, v = (x @ moe.fc1[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(g) * v) @ moe.fc2[e].T
        w = ((index == e) * weights).sum(-1, keepdim=True)
        expected += w * y
    assert_close(moe(x), expected, torch.float64)


def test_block_keeps_residual_in_fp32():
    torch.manual_seed(0)
    block = Block(
        36,
        Mamba2Mixer(36, d_state=5, headdim=24, chunk_size=8),
        mlp=GatedMLP(36, 20),
        residual_in_fp32=True,
        residual_multiplier=0.5,
    ).to(torch.bfloat16)
    x = torch.randn(1, 9, 36, dtype=torch.bfloat16)
    out = block(x)
    assert out.dtype == torch.float32
    block.residual_in_fp32 = False
    assert block(x).dtype == torch.bfloat16


def test_tracing_records_stages_only_inside_the_block():
    layer = Mamba2Mixer(36, d_state=5, headdim=24, chunk_size=8)
    layer.trace_prefix = "layers.4"
    x = torch.randn(1, 9, 36)
    layer(x)  # outside tracing: nothing recorded, nothing fails
    with tracing() as stages:
        y = layer(x)
        record(None, "extra", y)
    assert {
        "layers.4.in_proj",
        "layers.4.conv1d",
        "layers.4.x",
        "layers.4.B",
        "layers.4.C",
        "layers.4.dt",
        "layers.4.ssm_out",
        "layers.4.gate",
        "layers.4.norm",
        "layers.4.out_proj",
        "extra",
    } <= set(stages)
    assert stages["layers.4.B"].shape == (1, 9, 5)


def _unfused_block(block: Block, hidden: torch.Tensor) -> torch.Tensor:
    """The block as separate ops: hidden + m * mixer(norm(hidden)), then the MLP the same way."""
    dtype = block.norm.weight.dtype
    up = lambda t: t.float() if block.residual_in_fp32 and t.dtype != torch.float64 else t
    normed = ops.rms_norm(hidden.to(dtype), block.norm.weight, eps=block.norm.eps)
    hidden = up(hidden) + block.mixer(normed) * block.residual_multiplier
    if block.mlp is not None:
        normed = ops.rms_norm(hidden.to(dtype), block.norm2.weight, eps=block.norm2.eps)
        hidden = up(hidden) + block.mlp(normed) * block.residual_multiplier
    return hidden


@pytest.mark.parametrize("backend", backend_params("ssmkit.ops.norm"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "with_mlp, residual_in_fp32, multiplier", [(True, True, 0.5), (False, True, 1.0), (True, False, 0.246)]
)
def test_block_fused_norms_match_unfused_ops(backend, dtype, with_mlp, residual_in_fp32, multiplier, device):
    """Block.forward (add + norm fused) and a chain of Block.forward_prenorm calls (the decode
    loop's form) give what the separate ops give, in the residual dtype the block promises."""
    torch.manual_seed(0)
    make = lambda: Block(
        37,
        Mamba2Mixer(37, d_state=5, headdim=37, chunk_size=8),
        mlp=GatedMLP(37, 20) if with_mlp else None,
        residual_in_fp32=residual_in_fp32,
        residual_multiplier=multiplier,
    )
    blocks = [make(), make()]
    for block in blocks:
        _perturb(block)
        block.to(device=device, dtype=dtype)
    x = torch.randn(2, 9, 37, device=device).to(dtype)
    with torch.no_grad(), ops.backend(backend):
        expected = _unfused_block(blocks[1], _unfused_block(blocks[0], x))
        got = blocks[1](blocks[0](x))
        branch, residual = None, x
        for block in blocks:
            branch, residual = block.forward_prenorm(branch, residual)
        chained = blocks[1].add(residual, branch)
    residual_dtype = torch.float32 if residual_in_fp32 and dtype != torch.float64 else dtype
    assert got.dtype == chained.dtype == expected.dtype == residual_dtype
    assert_close(got, expected, dtype, scale=fp64_scale(device, 1.0), name="forward")
    assert_close(chained, expected, dtype, scale=fp64_scale(device, 1.0), name="forward_prenorm")
