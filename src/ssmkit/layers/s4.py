"""S4D layer (Gu et al., 2022, "On the Parameterization and Initialization of Diagonal State Space
Models")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit import ops
from ssmkit.layers.state import SSMState
from ssmkit.layers.tracing import record


class S4DLayer(nn.Module):
    """Per channel a diagonal SSM (ZOH-discretised, step exp(log_dt)) applied as a long convolution,
    then GELU and a GLU output projection.

    x: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model)
    init "real": A = -exp(A_log) with A_log = log(1..d_state) (S4D-Real); "lin": complex
    A = -exp(A_log) + i * A_imag with A_imag = pi * n, d_state / 2 conjugate pairs (S4D-Lin).
    Parameters: log_dt (d_model,), A_log (d_model, modes), [A_imag (d_model, modes)],
    C (d_model, modes[, 2]), D (d_model,); B is fixed to ones (as in S4D).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        init: str = "real",
    ) -> None:
        super().__init__()
        if init not in ("real", "lin"):
            raise ValueError(f"init must be 'real' or 'lin', got {init!r}")
        self.d_model, self.d_state, self.init = d_model, d_state, init
        self.dt_min, self.dt_max = dt_min, dt_max
        self.modes = d_state if init == "real" else d_state // 2
        if init == "lin" and d_state % 2:
            raise ValueError(f"S4D-Lin needs an even d_state (conjugate pairs), got {d_state}")
        self.log_dt = nn.Parameter(torch.empty(d_model))
        self.A_log = nn.Parameter(torch.empty(d_model, self.modes))
        self.A_imag = nn.Parameter(torch.empty(d_model, self.modes)) if init == "lin" else None
        self.C = nn.Parameter(torch.empty(d_model, self.modes, *(() if init == "real" else (2,))))
        self.D = nn.Parameter(torch.empty(d_model))
        self.out_proj = nn.Linear(d_model, 2 * d_model)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        self.log_dt.uniform_(math.log(self.dt_min), math.log(self.dt_max))
        if self.init == "real":
            _, A_log = ops.s4.s4d_real_init(self.d_model, self.d_state)
            self.A_log.copy_(A_log)
            # Variance 1/N per mode keeps the kernel's sum O(1) whatever the state size.
            self.C.normal_(0.0, self.modes**-0.5)
        else:
            A = ops.s4.s4d_lin_init(self.d_model, self.d_state)
            self.A_log.copy_(torch.log(-A.real))
            self.A_imag.copy_(A.imag)
            self.C.normal_(0.0, (2 * self.modes) ** -0.5)
        self.D.normal_()

    def ssm_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A, B, C: (d_model, modes) (complex for "lin") and dt: (d_model,), in fp32 (fp64 stays)."""
        real = torch.float64 if self.A_log.dtype == torch.float64 else torch.float32
        A = -torch.exp(self.A_log.to(real))
        C = self.C.to(real)
        if self.init == "lin":
            A = torch.complex(A, self.A_imag.to(real))
            C = torch.view_as_complex(C.contiguous())
        B = torch.ones_like(A)
        return A, B, C, torch.exp(self.log_dt.to(real))

    def allocate_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> SSMState:
        """ssm: (batch, d_model, modes) in fp32 (complex64 for "lin"; 64-bit for fp64)."""
        wide = dtype == torch.float64
        state_dtype = (
            (torch.complex128 if wide else torch.complex64)
            if self.init == "lin"
            else (torch.float64 if wide else torch.float32)
        )
        return SSMState(
            conv=None, ssm=torch.zeros(batch, self.d_model, self.modes, dtype=state_dtype, device=device)
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
        """hidden: (batch, seqlen, d_model); cu_seqlens: (num_seqs + 1,) boundaries of packed
        sequences (each convolved on its own); state: initial state, overwritten with the final one
        (runs the recurrence instead of the FFT convolution)."""
        u = hidden.transpose(1, 2)  # (batch, d_model, seqlen)
        A, B, C, dt = self.ssm_parameters()
        D = self.D.to(dt.dtype)
        if state is not None:
            y, last = ops.s4.s4d_recurrent(u, A, B, C, dt, D, initial_state=state.ssm, return_state=True)
            state.store(ssm=last)
        elif cu_seqlens is not None:
            # The FFT convolution has no notion of sequence boundaries: convolve each sequence alone.
            bounds = cu_seqlens.tolist()
            pieces = [
                ops.s4.s4d_forward(u[..., start:end], A, B, C, dt, D)
                for start, end in zip(bounds[:-1], bounds[1:])
                if end > start
            ]
            y = torch.cat(pieces, dim=-1)
        else:
            y = ops.s4.s4d_forward(u, A, B, C, dt, D)
        y = y.transpose(1, 2)
        record(self, "ssm_out", y)
        out = F.glu(self.out_proj(F.gelu(y)), dim=-1)
        record(self, "out_proj", out)
        return out
