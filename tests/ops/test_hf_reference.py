"""Independent reference: Hugging Face ``transformers``' pure-PyTorch Mamba and Mamba-2 paths.

We feed the mixers' own projections through our operators and must reproduce their outputs. This
is a test dependency only; the tests skip with a reason when ``transformers`` is not installed.
"""

from __future__ import annotations

import pytest
import torch

from ssmkit import ops
from tests.helpers import assert_close
from tests.hf_checkpoints import hf_gated_norm, hf_gated_norm_group_size

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")


def _mamba1_mixer(hidden=24, state=13, expand=2, conv=4) -> torch.nn.Module:
    config = transformers.MambaConfig(
        hidden_size=hidden,
        state_size=state,
        expand=expand,
        conv_kernel=conv,
        num_hidden_layers=1,
        vocab_size=32,
        use_mambapy=False,
    )
    mixer = modeling_mamba.MambaMixer(config, layer_idx=0).eval()
    with torch.no_grad():  # random, non-trivial weights everywhere (D and A_log would be too tidy)
        for param in mixer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return mixer


def _mamba2_mixer(hidden=32, heads=6, head_dim=16, groups=3, state=13, chunk=16, conv=4) -> torch.nn.Module:
    config = transformers.Mamba2Config(
        hidden_size=hidden,
        num_heads=heads,
        head_dim=head_dim,
        expand=heads * head_dim // hidden,
        n_groups=groups,
        state_size=state,
        chunk_size=chunk,
        conv_kernel=conv,
        num_hidden_layers=1,
        vocab_size=32,
        time_step_limit=(0.0, 1.5),
    )
    mixer = modeling_mamba2.Mamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in mixer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return mixer


def _ours_mamba1(mixer: torch.nn.Module, hidden_states: torch.Tensor, backend: str) -> torch.Tensor:
    projected = mixer.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 * d_inner, seqlen)
    x, z = projected.chunk(2, dim=1)
    x = ops.causal_conv1d_fn(
        x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation="silu", backend=backend
    )
    dt, B, C = torch.split(
        mixer.x_proj(x.transpose(1, 2)),
        [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size],
        dim=-1,
    )
    dt = mixer.dt_proj.weight @ dt.transpose(1, 2)  # (batch, d_inner, seqlen); bias goes to the scan
    A = -torch.exp(mixer.A_log.float())
    y = ops.selective_scan_fn(
        x,
        dt,
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        mixer.D.float(),
        z,
        delta_bias=mixer.dt_proj.bias.float(),
        delta_softplus=True,
        backend=backend,
    )
    return mixer.out_proj(y.transpose(1, 2))


def _ours_mamba2(mixer: torch.nn.Module, hidden_states: torch.Tensor, backend: str) -> torch.Tensor:
    batch, seqlen, _ = hidden_states.shape
    d_inner, groups, state = mixer.intermediate_size, mixer.n_groups, mixer.ssm_state_size
    gate, xBC, dt = mixer.in_proj(hidden_states).split([d_inner, mixer.conv_dim, mixer.num_heads], dim=-1)
    xBC = ops.causal_conv1d_fn(
        xBC.transpose(1, 2),
        mixer.conv1d.weight.squeeze(1),
        mixer.conv1d.bias,
        activation="silu",
        backend=backend,
    ).transpose(1, 2)
    x, B, C = torch.split(xBC, [d_inner, groups * state, groups * state], dim=-1)
    y = ops.mamba_chunk_scan_combined(
        x.reshape(batch, seqlen, mixer.num_heads, mixer.head_dim),
        dt,
        -torch.exp(mixer.A_log.float()),
        B.reshape(batch, seqlen, groups, state),
        C.reshape(batch, seqlen, groups, state),
        mixer.chunk_size,
        D=mixer.D,
        dt_bias=mixer.dt_bias,
        dt_softplus=True,
        dt_limit=mixer.time_step_limit,
        backend=backend,
    )
    y = ops.rms_norm_gated(
        y.reshape(batch, seqlen, d_inner),
        mixer.norm.weight,
        gate,
        eps=mixer.norm.variance_epsilon,
        group_size=hf_gated_norm_group_size(mixer.norm, d_inner),  # d_inner // groups from 5.23 on
        norm_before_gate=False,
        backend=backend,
    )
    return mixer.out_proj(y)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("seqlen", [1, 37])
def test_mamba1_mixer_matches_transformers(backend: str, seqlen: int) -> None:
    mixer = _mamba1_mixer()
    hidden_states = torch.randn(2, seqlen, 24)
    with torch.no_grad():
        expected = mixer(hidden_states)
        actual = _ours_mamba1(mixer, hidden_states, backend)
    assert_close(actual, expected, torch.float32, scale=10)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("seqlen", [5, 37])  # 37 is not a multiple of the chunk size (16)
def test_mamba2_mixer_matches_transformers(backend: str, seqlen: int) -> None:
    mixer = _mamba2_mixer()
    hidden_states = torch.randn(2, seqlen, 32)
    with torch.no_grad():
        expected = mixer(hidden_states)
        actual = _ours_mamba2(mixer, hidden_states, backend)
    assert_close(actual, expected, torch.float32, scale=10)


def test_mamba1_decode_step_matches_transformers() -> None:
    batch, dim, state = 3, 37, 13
    ssm_state = torch.randn(batch, dim, state)
    x, dt, z = torch.randn(batch, dim), torch.randn(batch, dim), torch.randn(batch, dim)
    A, B, C = -torch.rand(dim, state) - 0.1, torch.randn(batch, state), torch.randn(batch, state)
    D, dt_bias = torch.randn(dim), torch.randn(dim)
    theirs_state, ours_state = ssm_state.clone(), ssm_state.clone()
    expected = modeling_mamba.mamba_selective_state_update(
        theirs_state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True, z=z
    )
    actual = ops.selective_state_update(
        ours_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True
    )
    assert_close(actual, expected, torch.float32)
    assert_close(ours_state, theirs_state, torch.float32, name="state")


def test_mamba2_decode_step_matches_transformers() -> None:
    # Laid out exactly as the Hugging Face Mamba-2 mixer calls it: per-head values expanded with stride 0.
    batch, heads, head_dim, groups, state = 2, 6, 16, 3, 13
    ssm_state = torch.randn(batch, heads, head_dim, state)
    x = torch.randn(batch, heads, head_dim)
    dt = torch.randn(batch, heads)[..., None].expand(-1, -1, head_dim)
    A = (-torch.rand(heads) - 0.1)[:, None, None].expand(-1, head_dim, state)
    B, C = torch.randn(batch, groups, state), torch.randn(batch, groups, state)
    D = torch.randn(heads)[:, None].expand(-1, head_dim)
    dt_bias = torch.randn(heads)[:, None].expand(-1, head_dim)
    theirs_state, ours_state = ssm_state.clone(), ssm_state.clone()
    expected = modeling_mamba2.mamba2_selective_state_update(
        theirs_state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True
    )
    actual = ops.selective_state_update(ours_state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)
    assert_close(actual, expected, torch.float32)
    assert_close(ours_state, theirs_state, torch.float32, name="state")


def test_ssd_final_state_matches_transformers() -> None:
    batch, seqlen, heads, head_dim, groups, state, chunk = 2, 45, 6, 8, 2, 13, 16
    x, dt = torch.randn(batch, seqlen, heads, head_dim), torch.randn(batch, seqlen, heads)
    A = -torch.rand(heads) - 0.2
    B, C = torch.randn(batch, seqlen, groups, state), torch.randn(batch, seqlen, groups, state)
    D, dt_bias, h0 = torch.randn(heads), torch.randn(heads), torch.randn(batch, heads, head_dim, state)
    expected, expected_state = modeling_mamba2.mamba2_chunk_scan(
        x,
        dt,
        A,
        B,
        C,
        chunk,
        D=D,
        dt_bias=dt_bias,
        initial_states=h0,
        dt_softplus=True,
        return_final_states=True,
    )
    actual, actual_state = ops.mamba_chunk_scan_combined(
        x,
        dt,
        A,
        B,
        C,
        chunk,
        D=D,
        dt_bias=dt_bias,
        initial_states=h0,
        dt_softplus=True,
        return_final_states=True,
    )
    assert_close(actual, expected, torch.float32, scale=10)
    assert_close(actual_state, expected_state, torch.float32, scale=10, name="final state")


def test_gated_rmsnorm_matches_transformers() -> None:
    norm = hf_gated_norm(48, group_size=16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, z = torch.randn(3, 7, 48), torch.randn(3, 7, 48)
    expected = norm(x, z)
    group_size = hf_gated_norm_group_size(norm, 48)
    actual = ops.rms_norm_gated(x, norm.weight, z, eps=1e-5, group_size=group_size, norm_before_gate=False)
    assert_close(actual, expected, torch.float32)
