"""GroundedMamba components: shapes, the stability mechanisms the document asks for (spectral bound,
LayerNormed states, dt range), per-head decay, memory write cadence, gate schedule, the layer
contract (state passing, decode == forward, packed sequences) and a >10k-token streaming run."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from ssmkit.layers.grounded import (
    GroundedMixer,
    GroundedState,
    RWKVGroundedMemory,
    StableStateSSM,
    stable_state_scan,
)
from tests.helpers import assert_close

D_MODEL = 12  # small and not a power of two


def small_mixer(**overrides) -> GroundedMixer:
    """d_inner 24, d_state 13, 3 WKV heads of 5, 40 memory slots in 3 retrieval heads."""
    kwargs = dict(
        d_state=13, num_heads=3, head_dim=5, memory_size=40, retrieval_heads=3, chunk_size=8,
        gate_fixed_steps=3, memory_update_every=2,
    )  # fmt: skip
    kwargs.update(overrides)
    return GroundedMixer(D_MODEL, **kwargs)


@contextlib.contextmanager
def single_thread():
    """The SSM scan is thousands of tiny sequential steps; on a CPU shared with other jobs, waking a
    second thread for each of them costs more than the step itself. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_shapes_and_state(device):
    mixer = small_mixer().to(device)
    hidden = torch.randn(2, 19, D_MODEL, device=device)
    out = mixer(hidden)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    state = mixer.allocate_state(2, dtype=torch.bfloat16, device=device)
    assert isinstance(state, GroundedState)
    assert state.ssm.shape == (2, 24, 13) and state.ssm.dtype == torch.float32
    assert state.wkv.shape == (2, 3, 5, 5) and state.wkv.dtype == torch.float32
    assert state.nbytes() == 4 * (2 * 24 * 13 + 2 * 3 * 5 * 5)
    mixer(hidden, state=state)
    assert state.ssm.abs().sum() > 0 and state.wkv.abs().sum() > 0
    state.reset()
    assert state.ssm.abs().sum() == 0 and state.wkv.abs().sum() == 0


def test_bf16_parameters_run_and_return_bf16(device):
    mixer = small_mixer().to(device=device, dtype=torch.bfloat16)
    hidden = torch.randn(2, 11, D_MODEL, device=device, dtype=torch.bfloat16)
    reference = small_mixer().to(device)
    reference.load_state_dict({k: v.float() for k, v in mixer.state_dict().items()})
    out = mixer(hidden)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Same (rounded) weights in fp32: the bf16 model computes its scans in fp32, so it stays close.
    assert_close(out, reference(hidden.float()), torch.bfloat16, scale=2.0)


def test_every_parameter_gets_a_finite_gradient(device):
    # A fresh bank holds zero values (nothing written yet), so the query projection learns only
    # after the first write: run two training calls with a write on the second.
    mixer = small_mixer(gate_fixed_steps=0, memory_update_every=1).to(device)
    mixer(torch.randn(2, 9, D_MODEL, device=device))
    mixer.zero_grad()
    out = mixer(torch.randn(2, 9, D_MODEL, device=device))
    losses = mixer.auxiliary_losses()
    (out.square().mean() + 0.1 * losses["state_norm"] + 0.05 * losses["memory_consistency"]).backward()
    for name, param in mixer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("discretization", ["euler", "zoh"])
def test_spectral_normalisation_keeps_eigenvalues_inside_the_unit_circle(discretization, device):
    ssm = StableStateSSM(D_MODEL, d_state=13, discretization=discretization).to(device)
    eye = torch.eye(13, dtype=torch.float64, device=device)
    for A_raw in (
        ssm.A_raw.detach().clone(),
        torch.eye(13) * 0.5 + torch.randn(13, 13),
        torch.randn(13, 13) * 30,
    ):
        with torch.no_grad():
            ssm.A_raw.copy_(A_raw)
        A = ssm.transition().double()
        # The bound the normalisation enforces at dt_max ...
        assert torch.linalg.matrix_norm(eye + ssm.dt_max * A, ord=2) <= ssm.spectral_bound + 1e-6
        for dt in (ssm.dt_min, 0.037, ssm.dt_max):
            transition = eye + dt * A if discretization == "euler" else torch.linalg.matrix_exp(dt * A)
            radius = torch.linalg.eigvals(transition).abs().max().item()
            # ... gives |lambda| <= 1 - (dt / dt_max)(1 - rho) < 1 at every step size.
            assert radius < 1.0
            if discretization == "euler":
                assert radius <= 1 - dt / ssm.dt_max * (1 - ssm.spectral_bound) + 1e-9


@pytest.mark.parametrize("discretization", ["euler", "zoh"])
def test_scan_gradients_match_finite_differences(discretization, device):
    """The scan has no second implementation to compare with: check its autograd (per-step
    LayerNorm, resets, initial state) against finite differences in fp64."""
    batch, seqlen, d_inner, d_state = 1, 6, 3, 4
    f64 = dict(dtype=torch.float64, device=device)
    args = (
        torch.randn(batch, seqlen, d_inner, **f64),
        torch.rand(batch, seqlen, d_inner, **f64) * 0.1,
        -0.1 * torch.eye(d_state, **f64) + 0.3 * torch.randn(d_state, d_state, **f64),
        torch.randn(batch, seqlen, d_state, **f64),
        torch.randn(batch, seqlen, d_state, **f64),
        1.0 + 0.1 * torch.randn(d_state, **f64),
        0.1 * torch.randn(d_state, **f64),
        torch.randn(batch, d_inner, d_state, **f64),
    )
    args = tuple(a.requires_grad_(True) for a in args)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32, device=device)

    def scan(x, dt, A, B, C, weight, bias, initial):
        return stable_state_scan(
            x, dt, A, B, C, weight, bias, eps=1e-5, discretization=discretization,
            initial_state=initial, seq_idx=seq_idx,
        )  # fmt: skip

    assert torch.autograd.gradcheck(scan, args)


def test_initialisation_follows_the_document(device):
    torch.manual_seed(0)
    ssm = StableStateSSM(64, d_state=16)
    A = ssm.A_raw.detach()
    off_diagonal = A - torch.diag(torch.diagonal(A))
    assert torch.allclose(torch.diagonal(A), torch.full((16,), -0.1), atol=0.05)
    assert 0.005 < off_diagonal.std().item() < 0.015
    # Already inside the bound at init: the normalisation leaves A untouched.
    assert_close(ssm.transition(), A, torch.float32)
    assert 0.005 < ssm.x_proj.weight.std().item() < 0.015  # B, C projections
    half = ssm.d_inner // 2
    assert torch.equal(ssm.dt_proj.bias[:half], torch.full((half,), 1.0))
    assert torch.equal(ssm.dt_proj.bias[half:], torch.full((half,), 0.5))
    dt = ssm.step_sizes(torch.randn(3, 7, ssm.dt_rank) * 100)
    assert dt.min() >= ssm.dt_min and dt.max() <= ssm.dt_max


@pytest.mark.parametrize("num_heads", [3, 4])
def test_decay_per_head_is_geometric(num_heads):
    memory = RWKVGroundedMemory(D_MODEL, num_heads=num_heads, head_dim=4, memory_size=8)
    expected = torch.exp(-5.0 * torch.arange(1, num_heads + 1, dtype=torch.float32) / num_heads)
    assert_close(memory.decay(), expected, torch.float32)
    # Learned: the decay has a gradient.
    out, _ = memory(torch.randn(1, 6, D_MODEL))
    out.sum().backward()
    assert memory.log_decay.grad is not None and memory.log_decay.grad.abs().sum() > 0


def test_state_is_layer_normed_after_every_update(device):
    """With the initial LayerNorm (weight 1, bias 0) every channel's state has mean 0 and norm
    sqrt(d_state * var / (var + eps)) <= sqrt(d_state), var that of the pre-norm state. The first
    update from a zero state is tiny (B starts at std 0.01), so eps dominates and the norm starts
    small; from the second step on the state carries the previous normalised one and its norm
    approaches sqrt(d_state)."""
    ssm = StableStateSSM(D_MODEL, d_state=13).to(device)
    _, state = ssm(torch.randn(2, 1, D_MODEL, device=device))
    first = torch.linalg.vector_norm(state, dim=-1)
    assert state.mean(-1).abs().max() < 1e-5 and first.max() <= math.sqrt(13)
    # The second step still sees a small pre-norm variance; a few steps later eps is negligible.
    for length, lowest in ((1, 0.9), (5, 0.99), (17, 0.99)):
        _, state = ssm(torch.randn(2, length, D_MODEL, device=device), initial_state=state)
        assert state.mean(-1).abs().max() < 1e-5
        norms = torch.linalg.vector_norm(state, dim=-1)
        assert norms.max() <= math.sqrt(13) + 1e-4
        assert norms.min() >= lowest * math.sqrt(13)


def test_memory_writes_follow_the_cadence(device):
    memory = RWKVGroundedMemory(D_MODEL, num_heads=3, head_dim=4, memory_size=10, memory_update_every=3).to(
        device
    )
    changed, buffers = [], (memory.memory_keys.data_ptr(), memory.memory_values.data_ptr())
    for _ in range(7):
        keys, values = memory.memory_keys.clone(), memory.memory_values.clone()
        memory(torch.randn(2, 7, D_MODEL, device=device))
        changed.append(
            not (torch.equal(memory.memory_keys, keys) and torch.equal(memory.memory_values, values))
        )
    assert changed == [False, False, True, False, False, True, False]
    assert (memory.memory_keys.data_ptr(), memory.memory_values.data_ptr()) == buffers  # written in place
    assert int(memory.step) == 7
    memory.eval()  # inference never writes
    keys = memory.memory_keys.clone()
    for _ in range(4):
        memory(torch.randn(2, 7, D_MODEL, device=device))
    assert torch.equal(memory.memory_keys, keys) and int(memory.step) == 7


def test_memory_write_is_a_slow_ema(device):
    """One write moves the most-addressed slot exactly alpha of the way to its target."""
    memory = RWKVGroundedMemory(D_MODEL, num_heads=2, head_dim=3, memory_size=1, memory_update_every=1).to(
        device
    )
    query, output = torch.randn(2, 5, 6, device=device), torch.randn(2, 5, 6, device=device)
    keys, values = memory.memory_keys.clone(), memory.memory_values.clone()
    memory.write(query, output)
    # A single slot takes every token with weight 1: its target is the mean pair.
    assert_close(memory.memory_keys, keys + 0.01 * (query.mean((0, 1)) - keys), torch.float32)
    assert_close(memory.memory_values, values + 0.01 * (output.mean((0, 1)) - values), torch.float32)


def test_gate_is_fixed_then_learned(device):
    mixer = small_mixer(gate_fixed_steps=3).to(device)
    with torch.no_grad():
        mixer.gate_proj.bias.fill_(2.0)  # a learned value far from the fixed 0.7
    for call in range(5):
        mixer.zero_grad()
        mixer(torch.randn(2, 4, D_MODEL, device=device)).sum().backward()
        fixed = call < 3
        grad = mixer.gate_proj.bias.grad
        assert (grad.abs().sum() == 0) == fixed, f"call {call}: gate_proj gradient while fixed={fixed}"
    history = mixer.gate_trace()
    assert_close(history[:3], torch.full((3,), 0.7, device=device), torch.float32)
    assert_close(
        history[3:], torch.full((2,), torch.sigmoid(torch.tensor(2.0)).item(), device=device), torch.float32
    )


def test_gate_history_is_a_ring():
    mixer = small_mixer(gate_fixed_steps=100, gate_history_size=4)
    for _ in range(6):
        mixer(torch.randn(1, 3, D_MODEL))
    assert mixer.gate_trace().shape == (4,) and int(mixer.step) == 6


def test_default_gate_starts_at_point_seven_and_learned_gate_is_continuous():
    mixer = small_mixer(gate_fixed_steps=1)
    hidden = torch.randn(2, 5, D_MODEL)
    fixed = mixer.gate(hidden)
    mixer.set_training_step(1)
    learned = mixer.gate(hidden)
    assert_close(learned, fixed, torch.float32)  # zero-initialised weight, bias logit(0.7)


@pytest.mark.parametrize("discretization", ["euler", "zoh"])
def test_decode_equals_forward(discretization, device):
    mixer = small_mixer(discretization=discretization).to(device=device, dtype=torch.float64).eval()
    hidden = torch.randn(2, 13, D_MODEL, device=device, dtype=torch.float64)
    state = mixer.allocate_state(2, dtype=torch.float64, device=device)
    out = mixer(hidden, state=state)
    stepped = mixer.allocate_state(2, dtype=torch.float64, device=device)
    outs = [mixer(hidden[:, t : t + 1], state=stepped, decode=True) for t in range(hidden.shape[1])]
    assert_close(torch.cat(outs, dim=1), out, torch.float64, name="out")
    assert_close(stepped.ssm, state.ssm, torch.float64, name="ssm state")
    assert_close(stepped.wkv, state.wkv, torch.float64, name="wkv state")


def test_split_forward_equals_one_pass(device):
    mixer = small_mixer().to(device=device, dtype=torch.float64).eval()
    hidden = torch.randn(2, 21, D_MODEL, device=device, dtype=torch.float64)
    whole = mixer.allocate_state(2, dtype=torch.float64, device=device)
    out = mixer(hidden, state=whole)
    parts = mixer.allocate_state(2, dtype=torch.float64, device=device)
    out_parts = torch.cat([mixer(hidden[:, :10], state=parts), mixer(hidden[:, 10:], state=parts)], dim=1)
    assert_close(out_parts, out, torch.float64)
    assert_close(parts.ssm, whole.ssm, torch.float64)
    assert_close(parts.wkv, whole.wkv, torch.float64)


def test_packed_sequences_equal_separate_ones(device):
    mixer = small_mixer().to(device=device, dtype=torch.float64).eval()
    bounds = [0, 7, 8, 20]
    hidden = torch.randn(1, bounds[-1], D_MODEL, device=device, dtype=torch.float64)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    packed = mixer(hidden, cu_seqlens=cu_seqlens)
    separate = torch.cat([mixer(hidden[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
    assert_close(packed, separate, torch.float64)


def test_wkv_state_is_detached_between_segments():
    mixer = small_mixer()
    state = mixer.allocate_state(1, dtype=torch.float32, device=torch.device("cpu"))
    mixer(torch.randn(1, 6, D_MODEL), state=state)
    assert not state.wkv.requires_grad  # RWKV state: no gradient across segments
    assert state.ssm.requires_grad  # the SSM state keeps its graph (the state-norm penalty needs it)


def test_auxiliary_losses(device):
    mixer = small_mixer().to(device)
    mixer(torch.randn(2, 9, D_MODEL, device=device))
    norms = mixer.last_state_norms()
    assert norms.shape == (2, 24)
    losses = mixer.auxiliary_losses(target_norm=5.0)
    assert_close(losses["state_norm"], (norms.mean() - 5.0) ** 2, torch.float32)
    assert losses["memory_consistency"].dim() == 0 and torch.isfinite(losses["memory_consistency"])


def test_streaming_over_10k_tokens_keeps_norms_and_state_size(device):
    """> 10k tokens in chunks through one state: the SSM state norms stay in [0.1, 10], the WKV
    state stays bounded, and the state neither grows nor is reallocated."""
    torch.manual_seed(0)
    mixer = GroundedMixer(8, d_state=8, expand=2, num_heads=2, memory_size=16).to(device).eval()
    state = mixer.allocate_state(1, dtype=torch.float32, device=device)
    size, ssm_buffer, wkv_buffer = state.nbytes(), state.ssm.data_ptr(), state.wkv.data_ptr()
    total, chunk = 10_240, 1024
    with torch.no_grad(), single_thread():
        for start in range(0, total, chunk):
            # Inputs with a drifting scale: the state must not follow it.
            scale = 1.0 + 4.0 * start / total
            out = mixer(scale * torch.randn(1, chunk, 8, device=device), state=state)
            norms = mixer.last_state_norms()
            assert torch.isfinite(out).all()
            assert 0.1 <= norms.min().item() and norms.max().item() <= 10.0, (start, norms)
            assert torch.linalg.vector_norm(state.wkv).item() < 1e3
            assert state.nbytes() == size
    assert state.ssm.data_ptr() == ssm_buffer and state.wkv.data_ptr() == wkv_buffer


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="discretization must be one of"):
        StableStateSSM(D_MODEL, discretization="bilinear")
    with pytest.raises(ValueError, match="spectral_bound must be in"):
        StableStateSSM(D_MODEL, spectral_bound=1.0)
    with pytest.raises(ValueError, match="divisible by retrieval_heads"):
        RWKVGroundedMemory(D_MODEL, num_heads=3, head_dim=5, retrieval_heads=2)
    mixer = small_mixer()
    with pytest.raises(ValueError, match="decode takes one token per call"):
        mixer(
            torch.randn(1, 2, D_MODEL),
            state=mixer.allocate_state(1, dtype=torch.float32, device="cpu"),
            decode=True,
        )
    with pytest.raises(ValueError, match="decode=True needs the layer's state"):
        mixer(torch.randn(1, 1, D_MODEL), decode=True)
