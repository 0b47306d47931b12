"""The Mamba-1 mixer (Gu & Dao, 2023): input-dependent dt, B, C and a selective scan."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit import ops
from ssmkit.layers.state import SSMState, check_decode, keep_final
from ssmkit.layers.tracing import record


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus^-1(x) = x + log(1 - exp(-x)), written with expm1 to stay accurate for small x."""
    return x + torch.log(-torch.expm1(-x))


def compute_precision(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or fp64 when it is fp64: SSM parameters never enter the scan in half precision."""
    return t if t.dtype == torch.float64 else t.float()


def sample_dt(size: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """dt log-uniform in [dt_min, dt_max], floored, as in the Mamba papers."""
    log_dt = torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    return torch.exp(log_dt).clamp(min=floor)


class Mamba1Mixer(nn.Module):
    """in_proj to (x, z); causal depthwise conv + SiLU on x; x_proj to (dt_low, B, C);
    dt = dt_proj(dt_low); selective scan with D skip and SiLU(z) gate; out_proj.

    x: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model)
    Parameters: A_log (d_inner, d_state), D (d_inner,), dt_proj.bias (d_inner,) = softplus^-1(dt).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        conv_bias: bool = True,
        proj_bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.dt_min, self.dt_max, self.dt_init, self.dt_scale = dt_min, dt_max, dt_init, dt_scale
        self.dt_init_floor = dt_init_floor
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=proj_bias)
        # nn.Conv1d only holds the (d_inner, 1, d_conv) weight in the checkpoints' layout; the
        # convolution itself runs through ssmkit.ops.causal_conv1d_fn.
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-Real A (A_log = log(1..d_state)), D = 1, dt_proj as in the paper."""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5 * self.dt_scale
        if self.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif self.dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        dt = sample_dt(self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor)
        self.dt_proj.bias.copy_(inverse_softplus(dt))
        self.dt_proj.bias._no_reinit = True  # the model's generic bias zeroing must skip it

    def conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)

    def allocate_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> SSMState:
        """conv (batch, d_inner, d_conv - 1) in dtype; ssm (batch, d_inner, d_state) in fp32 (fp64 stays)."""
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return SSMState(
            conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, dtype=ssm_dtype, device=device),
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
        xz = self.in_proj(hidden)
        record(self, "in_proj", xz)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, seqlen) each
        conv_out = ops.causal_conv1d_fn(
            x,
            self.conv_weight(),
            self.conv1d.bias,
            seq_idx=seq_idx,
            initial_states=None if state is None else state.conv,
            return_final_states=state is not None,
            activation="silu",
        )
        x = keep_final(conv_out, state, "conv")
        record(self, "conv1d", x.transpose(1, 2))
        dt_low, B, C = torch.split(
            self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt = F.linear(dt_low, self.dt_proj.weight)  # the bias goes into the scan, in fp32
        for name, value in (("x", x.transpose(1, 2)), ("B", B), ("C", C), ("dt", dt)):
            record(self, name, value)
        record(self, "gate", z.transpose(1, 2))
        A = -torch.exp(compute_precision(self.A_log))
        scan_out = ops.selective_scan_fn(
            x,
            dt.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            compute_precision(self.D),
            z=z,
            delta_bias=compute_precision(self.dt_proj.bias),
            delta_softplus=True,
            return_last_state=state is not None,
            initial_state=None if state is None else state.ssm,
            cu_seqlens=cu_seqlens,
        )
        y = keep_final(scan_out, state, "ssm")
        y = y.transpose(1, 2)
        record(self, "ssm_out", y)
        out = self.out_proj(y)
        record(self, "out_proj", out)
        return out

    def _step(self, hidden: torch.Tensor, state: SSMState | None) -> torch.Tensor:
        check_decode(hidden, state)
        xz = self.in_proj(hidden[:, 0])
        record(self, "in_proj", xz[:, None])
        x, z = xz.chunk(2, dim=-1)  # (batch, d_inner)
        x = ops.causal_conv1d_update(x, state.conv, self.conv_weight(), self.conv1d.bias, activation="silu")
        record(self, "conv1d", x[:, None])
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)
        for name, value in (("x", x), ("B", B), ("C", C), ("dt", dt), ("gate", z)):
            record(self, name, value[:, None])
        # The step computes in fp32 whatever the parameters' dtype and takes A_log itself
        # (A = -exp(A_log) inside the kernel): no casts or exp launched per token.
        y = ops.selective_state_update(
            state.ssm,
            x,
            dt,
            self.A_log,
            B,
            C,
            D=self.D,
            z=z,
            dt_bias=self.dt_proj.bias,
            dt_softplus=True,
            A_is_log=True,
        )
        record(self, "ssm_out", y[:, None])
        out = self.out_proj(y)[:, None]
        record(self, "out_proj", out)
        return out
