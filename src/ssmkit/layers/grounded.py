"""GroundedMamba (issue 8): a stable selective SSM and an RWKV-style memory, mixed by a gate.

- :class:`StableStateSSM` — selective SSM with a full (d_state x d_state) transition, first-order
  (``A_d = I + dt A``) or ZOH discretisation, spectral normalisation, dt in [dt_min, dt_max] and
  LayerNorm of the state after every update.
- :class:`RWKVGroundedMemory` — the WKV recurrence (:mod:`ssmkit.ops.wkv`) with per-head decay and
  bonus, plus an explicit key-value memory bank read by attention and written slowly (EMA).
- :class:`GroundedMixer` — the mixer of the ``"grounded"`` layer pattern: ``g * ssm + (1 - g) *
  memory`` with g fixed at 0.7 for the first training steps and learned afterwards.
- :class:`GroundedState` — the fixed-size per-layer inference state of the mixer.

The state norm the trainer penalises (target 5) is that of the normalised SSM state; the mixer
reports it, and the memory-consistency loss, through :meth:`GroundedMixer.auxiliary_losses`.

Exactness and cost of the SSM path. LayerNorm after every update makes the recurrence nonlinear:
``h_t = LN(A_d(dt_t) h_{t-1} + dt_t B_t x_t)``. LayerNorm is invariant to the scale of its input,
so one could hope to carry an unnormalised state and normalise lazily; but the input term is
added *after* the previous normalisation, so ``h_t`` depends on the norm of every earlier
pre-normalisation state, and no linear (hence chunkable or parallel-scannable) recurrence computes
it. The model as specified is therefore computed exactly, step by step: one loop iteration per
token, vectorised over batch and channels (a handful of small tensor ops per step). That is the
only form here. A "normalise at chunk boundaries" variant would be a different model (the state
would run unnormalised inside a chunk), and with a full transition matrix its linear part is not
cheap to chunk either (products of different ``I + dt_t A`` matrices), so none is offered. On a
GPU the efficient exact form is a fused kernel that keeps ``h`` in registers and loops over time
inside the kernel (as Mamba-1's scan kernel does): :mod:`ssmkit.ops.stable_scan` has one ("euler",
forward and backward), which "auto" runs for CUDA tensors (27x the loop's forward+backward speed
on an H100 at GroundedMamba-minimal's training shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.mamba1 import compute_precision
from ssmkit.layers.state import check_decode
from ssmkit.layers.tracing import record
from ssmkit.ops.common import seq_idx_from_cu_seqlens
from ssmkit.ops.stable_scan import stable_scan
from ssmkit.ops.wkv import wkv, wkv_step

DISCRETIZATIONS = ("euler", "zoh")


# ---------------------------------------------------------------------------------------- state
@dataclass
class GroundedState:
    """Per-layer inference state of :class:`GroundedMixer`; its size does not depend on the length.

    ssm: (batch, d_inner, d_state), the LayerNormed state of :class:`StableStateSSM` (fp32, fp64
    for fp64 models); the trainer's state monitor reads this field.
    wkv: (batch, nheads, head_dim, head_dim), the WKV state of :class:`RWKVGroundedMemory`.
    The memory bank is not part of it: it belongs to the model (shared by every sequence).
    """

    ssm: torch.Tensor
    wkv: torch.Tensor

    def reset(self) -> None:
        self.ssm.zero_()
        self.wkv.zero_()

    def store(self, *, ssm: torch.Tensor | None = None, wkv: torch.Tensor | None = None) -> None:
        """Keep the final states of a call: in place without autograd (the buffers keep their
        identity, as CUDA graphs need), by rebinding while autograd records (the old tensors were
        saved for backward as initial states and must not be overwritten)."""
        for name, value in (("ssm", ssm), ("wkv", wkv)):
            if value is None:
                continue
            current = getattr(self, name)
            if torch.is_grad_enabled() and (value.requires_grad or current.requires_grad):
                setattr(self, name, value)
            else:
                current.copy_(value)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ssm, self.wkv))


# ------------------------------------------------------------------------------ StableStateSSM
def stable_state_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    *,
    eps: float,
    discretization: str = "euler",
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact recurrence of :class:`StableStateSSM`, one step per token.

    x, dt: (batch, seqlen, d_inner)   A: (d_state, d_state)   B, C: (batch, seqlen, d_state)
    norm_weight, norm_bias: (d_state,)   initial_state: (batch, d_inner, d_state)
    seq_idx: (batch, seqlen) int; the state restarts from zero where it changes.

    Per channel: ``z_t = A_d(dt_t) h_{t-1} + dt_t x_t B_t``, ``h_t = LayerNorm(z_t)`` over d_state,
    ``y_t = C_t . h_t``, with ``A_d = I + dt A`` ("euler") or ``exp(dt A)`` ("zoh"; the input term
    keeps Mamba's ``dt B`` simplification). All inputs must share one (compute) dtype.
    Returns y: (batch, seqlen, d_inner) and the final state (batch, d_inner, d_state).

    Runs :func:`ssmkit.ops.stable_scan.stable_scan` with the backend in force: the fused Triton
    kernels ("euler", fp32/fp64) for CUDA tensors, else the step-by-step PyTorch loop
    (:func:`ssmkit.ops.stable_scan.reference.stable_scan_reference`).
    """
    return stable_scan(
        x, dt, A, B, C, norm_weight, norm_bias, eps=eps, discretization=discretization,
        initial_state=initial_state, seq_idx=seq_idx,
    )  # fmt: skip


class StableStateSSM(nn.Module):
    """Selective SSM with a spectrally normalised full transition and LayerNormed states.

    hidden: (batch, seqlen, d_model) -> (batch, seqlen, d_model).
    in_proj -> (x, z) of d_inner = expand * d_model each; x_proj(x) -> (dt_low, B, C) with B, C of
    d_state; ``dt = dt_min + (dt_max - dt_min) * sigmoid(dt_proj(dt_low))``; the scan of
    :func:`stable_state_scan`; ``y = (scan + D x) * silu(z)``; out_proj.

    Parameters: A_raw (d_state, d_state), initialised ``-0.1 I + 0.01 noise``; the transition used
    is its spectral normalisation (:meth:`transition`). D (d_inner,). dt_proj.bias (d_inner,) holds
    the document's "thinking speeds" ``dt_bias_init = (1.0, 0.5)``: the first half of the channels
    start at the first value, the second half at the second (pre-sigmoid values, so dt starts at
    0.073 and 0.063 with the default range). The dt range is enforced by the sigmoid rather than
    by a hard clamp, which would zero the gradient of every channel outside the range. x_proj
    (which produces B and C) is initialised with std ``bc_init_std`` = 0.01.
    norm: LayerNorm over d_state (weight 1, bias 0), applied to the state after every update.

    Cost: the scan is exact and sequential (see the module docstring): O(seqlen) small steps; the
    ZOH discretisation adds a matrix exponential per channel and step (O(d_state^3)), so "euler"
    is the default and the one the document asks for.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | None = None,
        discretization: str = "euler",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_bias_init: tuple[float, float] = (1.0, 0.5),
        spectral_bound: float = 0.999,
        bc_init_std: float = 0.01,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
        if not 0.0 < dt_min < dt_max:
            raise ValueError(f"dt range must satisfy 0 < dt_min < dt_max, got ({dt_min}, {dt_max})")
        if not 0.0 < spectral_bound < 1.0:
            raise ValueError(f"spectral_bound must be in (0, 1), got {spectral_bound}")
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.discretization, self.dt_min, self.dt_max = discretization, dt_min, dt_max
        self.spectral_bound, self.norm_eps = spectral_bound, norm_eps
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_raw = nn.Parameter(torch.empty(d_state, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.norm = nn.LayerNorm(d_state, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.dt_bias_init = tuple(float(b) for b in dt_bias_init)
        self.bc_init_std = bc_init_std
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        n = self.d_state
        self.A_raw.copy_(-0.1 * torch.eye(n) + 0.01 * torch.randn(n, n))
        self.D.fill_(1.0)
        half = self.d_inner // 2
        self.dt_proj.bias[:half].fill_(self.dt_bias_init[0])
        self.dt_proj.bias[half:].fill_(self.dt_bias_init[1])
        self.dt_proj.bias._no_reinit = True  # LanguageModel.reset_parameters zeroes other biases
        nn.init.normal_(self.x_proj.weight, std=self.bc_init_std)
        self.norm.reset_parameters()

    def transition(self) -> torch.Tensor:
        """The continuous-time transition A (d_state, d_state) after spectral normalisation.

        With ``M = I + dt_max A_raw`` scaled down to spectral norm ``spectral_bound`` (rho) when it
        exceeds it, ``A = (M - I) / dt_max``. Then for every dt in (0, dt_max],
        ``I + dt A = (1 - dt/dt_max) I + (dt/dt_max) M`` has spectral norm at most
        ``1 - (dt/dt_max)(1 - rho) < 1``: every eigenvalue of the first-order transition lies
        strictly inside the unit circle, and the state contracts. The eigenvalues of A lie in the
        disc of radius rho/dt_max around -1/dt_max, so Re < 0 and ``exp(dt A)`` (ZOH) is inside
        the unit circle too. Computed in fp32 (fp64 stays fp64); one SVD of a d_state matrix.

        The default rho = 0.999 leaves the document's initialisation ``-0.1 I + 0.01 noise``
        untouched up to d_state 32 (there ``||M|| = 0.99 + ||0.001 noise|| < 0.999``); at
        d_state 64 the noise pushes ``||M||`` to ~1.001 and the first forward already sees A
        rescaled (about -0.12 I instead of -0.1 I).
        """
        A_raw = compute_precision(self.A_raw)
        eye = torch.eye(self.d_state, dtype=A_raw.dtype, device=A_raw.device)
        M = eye + self.dt_max * A_raw
        sigma = torch.linalg.matrix_norm(M, ord=2)
        M = M * (self.spectral_bound / sigma.clamp(min=self.spectral_bound))
        return (M - eye) / self.dt_max

    def step_sizes(self, dt_low: torch.Tensor) -> torch.Tensor:
        """dt_low: (..., dt_rank) -> dt: (..., d_inner) in [dt_min, dt_max], compute precision."""
        raw = compute_precision(self.dt_proj(dt_low))
        return self.dt_min + (self.dt_max - self.dt_min) * torch.sigmoid(raw)

    def allocate_ssm_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(batch, d_inner, d_state) zeros, fp32 (fp64 for fp64 models)."""
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.zeros(batch, self.d_inner, self.d_state, dtype=ssm_dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        initial_state: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: (batch, seqlen, d_model); initial_state: (batch, d_inner, d_state);
        seq_idx: (batch, seqlen) int. Returns (out (batch, seqlen, d_model), final state
        (batch, d_inner, d_state) in the compute precision)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.step_sizes(dt_low)
        dtype = dt.dtype
        xf = x.to(dtype)
        y, final = stable_state_scan(
            xf,
            dt,
            self.transition().to(dtype),
            B.to(dtype),
            C.to(dtype),
            self.norm.weight.to(dtype),
            self.norm.bias.to(dtype),
            eps=self.norm_eps,
            discretization=self.discretization,
            initial_state=None if initial_state is None else initial_state.to(dtype),
            seq_idx=seq_idx,
        )
        y = (y + xf * compute_precision(self.D)) * F.silu(z.to(dtype))
        record(self, "ssm_out", y)
        return self.out_proj(y.to(hidden.dtype)), final


# -------------------------------------------------------------------------- RWKVGroundedMemory
class RWKVGroundedMemory(nn.Module):
    """WKV recurrence plus an explicit key-value memory bank.

    hidden: (batch, seqlen, d_model) -> (batch, seqlen, d_model).
    r, k, v, g = receptance/key/value/gate(hidden), each (batch, seqlen, nheads * head_dim);
    ``o = GroupNorm_per_head(wkv(r, k, v, w, u))``; ``m = read(query(hidden))`` from the bank;
    ``out = out_proj((o + m) * silu(g))``.

    WKV parameters: ``w = exp(log_decay)`` (nheads,), the state is multiplied by exp(-w) per step;
    initialised so that the decay of head h is ``exp(-5 (h + 1) / nheads)``. time_first u
    (nheads, head_dim), initialised to 1 (the current token counts like the newest state entry).

    Memory bank: buffers memory_keys, memory_values (memory_size, nheads * head_dim), not trained
    by gradients. Read: attention over the slots with ``retrieval_heads`` heads. Write: every
    ``memory_update_every`` training forward calls (counted in the ``step`` buffer), each slot
    moves towards the mean of the (query, WKV output) pairs of the batch that address it,
    ``slot += alpha * (mass / max mass) * (target - slot)`` with ``alpha = memory_alpha``: slots
    nobody reads stay put. Detached from autograd. The write reads ``int(step)``, one host sync per
    training call on GPUs; the decode path (eval mode) never writes.
    ``last_memory_consistency``: mean squared difference between the bank read and the (detached)
    WKV output of the last forward, the memory-consistency auxiliary loss.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        head_dim: int | None = None,
        memory_size: int = 1024,
        memory_alpha: float = 0.01,
        memory_update_every: int = 100,
        retrieval_heads: int = 1,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        head_dim = head_dim if head_dim is not None else d_model // num_heads
        if head_dim <= 0:
            raise ValueError(
                f"head_dim must be >= 1, got {head_dim} (d_model {d_model}, num_heads {num_heads})"
            )
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.d_inner = num_heads * head_dim
        if self.d_inner % retrieval_heads != 0:
            raise ValueError(
                f"num_heads * head_dim ({self.d_inner}) must be divisible by retrieval_heads "
                f"({retrieval_heads})"
            )
        if not 0.0 < memory_alpha <= 1.0 or memory_update_every < 1 or memory_size < 1:
            raise ValueError(
                "memory needs memory_size >= 1, 0 < memory_alpha <= 1 and memory_update_every >= 1, got "
                f"{memory_size}, {memory_alpha}, {memory_update_every}"
            )
        self.memory_size, self.memory_alpha = memory_size, memory_alpha
        self.memory_update_every, self.retrieval_heads = memory_update_every, retrieval_heads
        self.chunk_size = chunk_size
        self.receptance = nn.Linear(d_model, self.d_inner, bias=False)
        self.key = nn.Linear(d_model, self.d_inner, bias=False)
        self.value = nn.Linear(d_model, self.d_inner, bias=False)
        self.gate = nn.Linear(d_model, self.d_inner, bias=False)
        self.query = nn.Linear(d_model, self.d_inner, bias=False)
        self.log_decay = nn.Parameter(torch.empty(num_heads))
        self.time_first = nn.Parameter(torch.empty(num_heads, head_dim))
        self.ln_x = nn.GroupNorm(num_heads, self.d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.register_buffer("memory_keys", torch.empty(memory_size, self.d_inner))
        self.register_buffer("memory_values", torch.empty(memory_size, self.d_inner))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.last_memory_consistency: torch.Tensor | None = None
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        heads = torch.arange(self.num_heads, dtype=torch.float32)
        self.log_decay.copy_(torch.log(5.0 * (heads + 1) / self.num_heads))
        self.time_first.fill_(1.0)
        self.ln_x.reset_parameters()
        # Keys spread on the unit sphere (per retrieval head), values start empty: the bank only
        # says what the writes have put in it.
        keys = torch.randn(self.memory_size, self.retrieval_heads, self.d_inner // self.retrieval_heads)
        self.memory_keys.copy_(F.normalize(keys, dim=-1).reshape(self.memory_size, self.d_inner))
        self.memory_values.zero_()
        self.step.zero_()

    def decay_rate(self) -> torch.Tensor:
        """w: (nheads,), positive, in the compute precision."""
        return torch.exp(compute_precision(self.log_decay))

    def decay(self) -> torch.Tensor:
        """The per-step multiplier of the WKV state, exp(-w): (nheads,)."""
        return torch.exp(-self.decay_rate())

    def _bank_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(..., d_inner) -> (..., retrieval_heads, d_inner / retrieval_heads)."""
        return t.unflatten(-1, (self.retrieval_heads, -1))

    def _slot_weights(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query: (batch, seqlen, d_inner), keys: (memory_size, d_inner) -> softmax over slots,
        (batch, heads, seqlen, memory_size)."""
        q = self._bank_heads(query).transpose(1, 2)  # (batch, heads, seqlen, dh)
        keys = self._bank_heads(keys.to(q.dtype)).transpose(0, 1)  # (heads, slots, dh)
        return torch.softmax((q @ keys.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)

    def read(
        self, query: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention over the bank (the buffers, or the given snapshot of them).
        query: (batch, seqlen, d_inner); keys, values: (memory_size, d_inner)
        Returns (batch, seqlen, d_inner)."""
        keys = self.memory_keys if keys is None else keys
        values = self.memory_values if values is None else values
        weights = self._slot_weights(query, keys)
        values = self._bank_heads(values.to(query.dtype)).transpose(0, 1)  # (heads, slots, dh)
        return (weights @ values).transpose(1, 2).flatten(2)

    @torch.no_grad()
    def write(self, query: torch.Tensor, output: torch.Tensor) -> None:
        """Move the slots towards the (query, output) pairs that address them (EMA, see the class
        docstring). query, output: (batch, seqlen, d_inner). The buffers are written in place
        (they keep their identity, which DDP's buffer broadcast relies on); a forward that writes
        reads from a snapshot, since its graph must not see the new values."""
        weights = self._slot_weights(query.float(), self.memory_keys)  # (batch, heads, seqlen, slots)
        weights = weights.transpose(0, 1).flatten(1, 2)  # (heads, batch * seqlen, slots)
        mass = weights.sum(1)  # (heads, slots)
        q = self._bank_heads(query.float()).flatten(0, 1).transpose(0, 1)  # (heads, tokens, dh)
        o = self._bank_heads(output.float()).flatten(0, 1).transpose(0, 1)
        denom = mass.clamp(min=1e-12)[..., None]
        target_keys = weights.transpose(1, 2) @ q / denom  # (heads, slots, dh)
        target_values = weights.transpose(1, 2) @ o / denom
        rate = (self.memory_alpha * mass / mass.amax(dim=-1, keepdim=True))[..., None]  # (heads, slots, 1)
        keys = self._bank_heads(self.memory_keys.float()).transpose(0, 1)
        values = self._bank_heads(self.memory_values.float()).transpose(0, 1)
        keys = keys + rate * (target_keys - keys)
        values = values + rate * (target_values - values)
        self.memory_keys.copy_(keys.transpose(0, 1).flatten(1))
        self.memory_values.copy_(values.transpose(0, 1).flatten(1))

    def allocate_wkv_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(batch, nheads, head_dim, head_dim) zeros, fp32 (fp64 for fp64 models)."""
        wkv_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.zeros(
            batch, self.num_heads, self.head_dim, self.head_dim, dtype=wkv_dtype, device=device
        )

    def _finish(self, hidden: torch.Tensor, wkv_out: torch.Tensor) -> torch.Tensor:
        """wkv_out: (batch, seqlen, nheads, head_dim) -> out (batch, seqlen, d_model); reads (and,
        in training, writes) the bank and records the memory-consistency loss."""
        batch, seqlen = hidden.shape[:2]
        o = self.ln_x(wkv_out.reshape(batch * seqlen, self.d_inner)).view(batch, seqlen, self.d_inner)
        query = self.query(hidden)
        writes = False
        if self.training:
            self.step += 1
            writes = int(self.step) % self.memory_update_every == 0
        if writes:  # backward needs the bank as this forward read it
            memory = self.read(query, self.memory_keys.clone(), self.memory_values.clone())
        else:
            memory = self.read(query)
        self.last_memory_consistency = (memory.float() - o.detach().float()).pow(2).mean()
        record(self, "wkv_out", o)
        record(self, "memory_read", memory)
        if writes:
            self.write(query.detach(), o.detach())
        return self.out_proj((o + memory) * F.silu(self.gate(hidden)))

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        initial_state: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: (batch, seqlen, d_model); initial_state: (batch, nheads, head_dim, head_dim);
        seq_idx: (batch, seqlen) int. Returns (out (batch, seqlen, d_model), final WKV state,
        detached: the recurrent state carries no gradient from one segment to the next)."""
        heads = (hidden.shape[0], hidden.shape[1], self.num_heads, self.head_dim)
        r, k, v = (proj(hidden).view(heads) for proj in (self.receptance, self.key, self.value))
        out, final = wkv(
            r, k, v, self.decay_rate(), compute_precision(self.time_first),
            initial_state=initial_state, return_final_state=True, seq_idx=seq_idx, chunk_size=self.chunk_size,
        )  # fmt: skip
        return self._finish(hidden, out), final.detach()

    def step_decode(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token: hidden (batch, 1, d_model); state (batch, nheads, head_dim, head_dim),
        updated in place. Returns (batch, 1, d_model)."""
        heads = (hidden.shape[0], self.num_heads, self.head_dim)
        r, k, v = (proj(hidden[:, 0]).view(heads) for proj in (self.receptance, self.key, self.value))
        out = wkv_step(state, r, k, v, self.decay_rate(), compute_precision(self.time_first))
        return self._finish(hidden, out[:, None])


# ------------------------------------------------------------------------------- GroundedMixer
class GroundedMixer(nn.Module):
    """The ``"grounded"`` mixer (GroundedMambaBlock's mixing): ``g * ssm(x) + (1 - g) * memory(x)``.

    hidden: (batch, seqlen, d_model) -> (batch, seqlen, d_model).
    Gate: for the first ``gate_fixed_steps`` training forward calls (the ``step`` buffer) g is fixed
    at ``gate_fixed_ssm`` (0.7); afterwards ``g = sigmoid(gate_proj(x))`` per token, with
    gate_proj's weight initialised to zero and its bias to logit(0.7), so the switch is smooth.
    The choice is made by ``torch.where`` on the step buffer (no host sync); gate_proj gets zero
    gradient while the gate is fixed. ``gate_history`` (gate_history_size,) records the mean g of
    every training call in a ring (read it in order with :meth:`gate_trace`).

    Layer contract: ``forward(hidden, *, seq_idx, cu_seqlens, state, decode)``; ``state`` (a
    :class:`GroundedState` from :meth:`allocate_state`) is read as the initial state and
    overwritten with the final one; ``decode=True`` takes one token.
    Auxiliary losses for the trainer: :meth:`auxiliary_losses`, from the last forward.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | None = None,
        discretization: str = "euler",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_bias_init: tuple[float, float] = (1.0, 0.5),
        spectral_bound: float = 0.999,
        num_heads: int = 4,
        head_dim: int | None = None,
        memory_size: int = 1024,
        memory_alpha: float = 0.01,
        memory_update_every: int = 100,
        retrieval_heads: int = 1,
        chunk_size: int = 64,
        gate_fixed_ssm: float = 0.7,
        gate_fixed_steps: int = 1000,
        gate_history_size: int = 1000,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not 0.0 < gate_fixed_ssm < 1.0:
            raise ValueError(f"gate_fixed_ssm must be in (0, 1), got {gate_fixed_ssm}")
        self.d_model = d_model
        self.ssm = StableStateSSM(
            d_model, d_state=d_state, expand=expand, dt_rank=dt_rank, discretization=discretization,
            dt_min=dt_min, dt_max=dt_max, dt_bias_init=dt_bias_init, spectral_bound=spectral_bound,
            norm_eps=norm_eps,
        )  # fmt: skip
        self.memory = RWKVGroundedMemory(
            d_model, num_heads=num_heads, head_dim=head_dim, memory_size=memory_size,
            memory_alpha=memory_alpha, memory_update_every=memory_update_every,
            retrieval_heads=retrieval_heads, chunk_size=chunk_size, norm_eps=norm_eps,
        )  # fmt: skip
        self.gate_fixed_ssm, self.gate_fixed_steps = gate_fixed_ssm, gate_fixed_steps
        self.gate_proj = nn.Linear(d_model, 1)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("gate_history", torch.zeros(gate_history_size), persistent=False)
        self.reset_gate_parameters()

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        nn.init.zeros_(self.gate_proj.weight)
        self.gate_proj.bias.fill_(math.log(self.gate_fixed_ssm / (1.0 - self.gate_fixed_ssm)))
        self.gate_proj.bias._no_reinit = True  # LanguageModel.reset_parameters zeroes other biases
        self.step.zero_()
        self.gate_history.zero_()

    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        """The SSM weight g: (batch, seqlen, 1) in the compute precision."""
        learned = torch.sigmoid(compute_precision(self.gate_proj(hidden)))
        fixed = torch.full_like(learned, self.gate_fixed_ssm)
        return torch.where(self.step < self.gate_fixed_steps, fixed, learned)

    def gate_trace(self) -> torch.Tensor:
        """The recorded mean SSM gate of the last training calls, oldest first: (n,)."""
        size, count = self.gate_history.numel(), int(self.step)
        if count <= size:
            return self.gate_history[:count].clone()
        start = count % size
        return torch.cat([self.gate_history[start:], self.gate_history[:start]])

    def allocate_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> GroundedState:
        """ssm (batch, d_inner, d_state) and wkv (batch, nheads, head_dim, head_dim), fp32 (fp64
        for fp64 models)."""
        return GroundedState(
            ssm=self.ssm.allocate_ssm_state(batch, dtype=dtype, device=device),
            wkv=self.memory.allocate_wkv_state(batch, dtype=dtype, device=device),
        )

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: GroundedState | None = None,
        decode: bool = False,
    ) -> torch.Tensor:
        """hidden: (batch, seqlen, d_model); seq_idx: (batch, seqlen) int32 and cu_seqlens:
        (num_seqs + 1,) int32 for packed sequences (restarts from zero); state: read as the
        initial state and overwritten with the final one; decode: one token per call."""
        if decode:
            check_decode(hidden, state)
        if cu_seqlens is not None and seq_idx is None:
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, hidden.shape[1])
        y_ssm, ssm_final = self.ssm(
            hidden, initial_state=None if state is None else state.ssm, seq_idx=seq_idx
        )
        if decode:
            y_mem = self.memory.step_decode(hidden, state.wkv)  # updates state.wkv in place
        else:
            y_mem, wkv_final = self.memory(
                hidden, initial_state=None if state is None else state.wkv, seq_idx=seq_idx
            )
            if state is not None:
                state.store(wkv=wkv_final)
        if state is not None:
            state.store(ssm=ssm_final)
        self._last_ssm_state = ssm_final

        g = self.gate(hidden)
        if self.training:
            index = (self.step % self.gate_history.numel()).reshape(1)
            self.gate_history.index_copy_(0, index, g.detach().mean().reshape(1).to(self.gate_history.dtype))
            self.step += 1
        record(self, "gate", g)
        return (g * y_ssm + (1.0 - g) * y_mem).to(hidden.dtype)

    def set_training_step(self, step: int) -> None:
        """Set the step counters of the gate schedule and the memory cadence (e.g. on resume when
        the checkpoint predates them, or to align them with the trainer's optimizer steps)."""
        self.step.fill_(step)
        self.memory.step.fill_(step)

    def last_state_norms(self) -> torch.Tensor:
        """L2 norms of the final SSM state of the last forward, one per (sequence, channel):
        (batch, d_inner), differentiable when that forward recorded gradients."""
        state = getattr(self, "_last_ssm_state", None)
        if state is None:
            raise RuntimeError("last_state_norms() needs a forward call first")
        return torch.linalg.vector_norm(state, dim=-1)

    def auxiliary_losses(self, target_norm: float = 5.0) -> dict[str, torch.Tensor]:
        """The document's auxiliary losses, from the last forward (weights are the trainer's):
        ``state_norm``: (mean SSM state norm - target_norm)^2; ``memory_consistency``: mean squared
        difference between the bank read and the WKV output."""
        norms = self.last_state_norms()
        return {
            "state_norm": (norms.mean() - target_norm).pow(2),
            "memory_consistency": self.memory.last_memory_consistency,
        }


# The name for the mixing module; the residual block around it is ssmkit.layers.Block.
GroundedMambaBlock = GroundedMixer
