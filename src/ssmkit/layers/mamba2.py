"""The Mamba-2 mixer (Dao & Gu, 2024): one fused input projection, SSD scan, gated RMSNorm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit import ops
from ssmkit.layers.mamba1 import compute_precision, inverse_softplus, sample_dt
from ssmkit.layers.norm import GatedRMSNorm
from ssmkit.layers.state import SSMState, check_decode, keep_final
from ssmkit.layers.tracing import record


class Mamba2Mixer(nn.Module):
    """in_proj to [z, xBC, dt]; causal depthwise conv + SiLU over xBC; split x, B, C; SSD scan
    with per-head scalar A, D skip and softplus(dt + dt_bias) clamped to dt_limit;
    gated RMSNorm per group (norm(y * silu(z)) by default, as Hugging Face); out_proj.

    x: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model)
    Sizes: d_inner = expand * d_model = nheads * headdim; B, C: (batch, seqlen, ngroups, d_state).
    Parameters: A_log, D, dt_bias (nheads,); norm.weight (d_inner,).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        conv_bias: bool = True,
        proj_bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        if self.d_inner % headdim != 0:
            raise ValueError(f"expand * d_model ({self.d_inner}) must be divisible by headdim ({headdim})")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups != 0:
            raise ValueError(f"nheads ({self.nheads}) must be divisible by ngroups ({ngroups})")
        self.chunk_size, self.dt_limit = chunk_size, tuple(dt_limit)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(
            self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps, norm_before_gate=norm_before_gate
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """A_log = log(1..nheads), D = 1, dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.log(torch.arange(1, self.nheads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(
            inverse_softplus(sample_dt(self.nheads, self.dt_min, self.dt_max, self.dt_init_floor))
        )
        self.norm.weight.fill_(1.0)

    def conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (conv_dim, d_conv)

    def _split_xBC(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., conv_dim) -> x (..., d_inner), B and C (..., ngroups * d_state)."""
        groups_state = self.ngroups * self.d_state
        return torch.split(xBC, [self.d_inner, groups_state, groups_state], dim=-1)

    def allocate_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> SSMState:
        """conv (batch, conv_dim, d_conv - 1) in dtype; ssm (batch, nheads, headdim, d_state) in fp32."""
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return SSMState(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, dtype=ssm_dtype, device=device),
        )

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: SSMState | None = None,
        decode: bool = False,
    ) -> torch.Tensor:
        """hidden: (batch, seqlen, d_model); seq_idx: (batch, seqlen) int32 and cu_seqlens:
        (num_seqs + 1,) int32 for packed sequences; state: read as the initial state and
        overwritten with the final one; decode: one token per call through the step kernels."""
        if decode:
            return self._step(hidden, state)
        batch, seqlen, _ = hidden.shape
        zxbcdt = self.in_proj(hidden)
        record(self, "in_proj", zxbcdt)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_out = ops.causal_conv1d_fn(
            xBC.transpose(1, 2),
            self.conv_weight(),
            self.conv1d.bias,
            seq_idx=seq_idx,
            initial_states=None if state is None else state.conv,
            return_final_states=state is not None,
            activation="silu",
        )
        xBC = keep_final(conv_out, state, "conv").transpose(1, 2)
        record(self, "conv1d", xBC)
        x, B, C = self._split_xBC(xBC)
        for name, value in (("x", x), ("B", B), ("C", C), ("dt", dt), ("gate", z)):
            record(self, name, value)
        A = -torch.exp(compute_precision(self.A_log))
        scan_out = ops.mamba_chunk_scan_combined(
            x.reshape(batch, seqlen, self.nheads, self.headdim),
            dt,
            A,
            B.reshape(batch, seqlen, self.ngroups, self.d_state),
            C.reshape(batch, seqlen, self.ngroups, self.d_state),
            chunk_size=self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            initial_states=None if state is None else state.ssm,
            seq_idx=seq_idx,
            cu_seqlens=cu_seqlens,
            return_final_states=state is not None,
        )
        y = keep_final(scan_out, state, "ssm")
        y = y.reshape(batch, seqlen, self.d_inner)
        record(self, "ssm_out", y)
        y = self.norm(y, z)
        record(self, "norm", y)
        out = self.out_proj(y)
        record(self, "out_proj", out)
        return out

    def _step(self, hidden: torch.Tensor, state: SSMState | None) -> torch.Tensor:
        check_decode(hidden, state)
        batch = hidden.shape[0]
        zxbcdt = self.in_proj(hidden[:, 0])
        record(self, "in_proj", zxbcdt[:, None])
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = ops.causal_conv1d_update(
            xBC, state.conv, self.conv_weight(), self.conv1d.bias, activation="silu"
        )
        record(self, "conv1d", xBC[:, None])
        x, B, C = self._split_xBC(xBC)
        for name, value in (("x", x), ("B", B), ("C", C), ("dt", dt), ("gate", z)):
            record(self, name, value[:, None])
        dt_bias, softplus = self.dt_bias, True
        if self.dt_limit != (0.0, math.inf):
            # The step kernel has no dt_limit: apply bias, softplus and clamp here, as the scan does.
            dt = F.softplus(compute_precision(dt) + compute_precision(self.dt_bias)).clamp(*self.dt_limit)
            dt_bias, softplus = None, False
        y = ops.selective_state_update(
            state.ssm,
            x.reshape(batch, self.nheads, self.headdim),
            dt,
            self.A_log,
            B.reshape(batch, self.ngroups, self.d_state),
            C.reshape(batch, self.ngroups, self.d_state),
            D=self.D,
            dt_bias=dt_bias,
            dt_softplus=softplus,
            A_is_log=True,  # A = -exp(A_log) inside the step: no launches for it per token
        )
        y = y.reshape(batch, self.d_inner)
        record(self, "ssm_out", y[:, None])
        y = self.norm(y, z)
        record(self, "norm", y[:, None])
        out = self.out_proj(y)[:, None]
        record(self, "out_proj", out)
        return out
