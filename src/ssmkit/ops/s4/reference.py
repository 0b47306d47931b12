"""Reference S4D (diagonal S4) math: discretization, the Vandermonde kernel, the recurrence and
the direct causal convolution. Plain formulas, fp64 / complex128 capable.

Shapes: A, B, C (H, N) complex (or real) diagonal SSM per channel, dt (H,) real, u (batch, H, L).

Conjugate-pair convention: a complex A stores one mode of each conjugate pair (S4D-Lin keeps N/2
modes of a real N-state system); the real output is y = 2 Re(C x). A real A is a real system of N
modes with y = C x.
"""

from __future__ import annotations

import torch


def real_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is 64-bit (float64 or complex128), else fp32."""
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(t is not None and t.dtype in wide for t in tensors) else torch.float32


def mode_dtype(A: torch.Tensor, *tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the modes are computed in: complex when A is complex, with the precision of the
    widest input."""
    real = real_dtype(A, *tensors)
    if A.is_complex():
        return torch.complex128 if real == torch.float64 else torch.complex64
    return real


def discretize_zoh_ref(
    A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold: dA = exp(dt A), dB = (exp(dt A) - 1) / A * B. A, B: (H, N), dt: (H,)."""
    dtype = mode_dtype(A, B, dt)
    A, B, dtA = A.to(dtype), B.to(dtype), dt.to(dtype)[:, None] * A.to(dtype)
    # expm1, not exp - 1: dt A is tiny for small steps, and exp(dt A) - 1 would cancel most digits.
    return torch.exp(dtA), torch.expm1(dtA) / A * B


def discretize_bilinear_ref(
    A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin): dA = (1 + dt A / 2) / (1 - dt A / 2), dB = dt B / (1 - dt A / 2)."""
    dtype = mode_dtype(A, B, dt)
    step = dt.to(dtype)[:, None]
    half = step * A.to(dtype) / 2
    return (1 + half) / (1 - half), step * B.to(dtype) / (1 - half)


def discretize(
    A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return discretize_zoh_ref(A, B, dt) if method == "zoh" else discretize_bilinear_ref(A, B, dt)


def s4d_kernel_ref(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, length: int, method: str
) -> torch.Tensor:
    """Convolution kernel K[h, l] = sum_n C[h, n] dB[h, n] dA[h, n]^l (2 Re of it for complex A).

    Vandermonde form: the powers are one (H, N, L) tensor, computed as exp(l dt A) for ZOH (exact
    and stable) and as dA^l for bilinear (whose dA may be negative for real A).
    Returns K: (H, length), real, fp32 or fp64.
    """
    dA, dB = discretize(A, B, dt, method)
    dtype = dA.dtype
    steps = torch.arange(length, device=A.device, dtype=real_dtype(dA))
    if method == "zoh":
        powers = torch.exp((dt.to(dtype)[:, None] * A.to(dtype)).unsqueeze(-1) * steps)
    else:
        powers = dA.unsqueeze(-1) ** steps
    kernel = torch.einsum("hn,hnl->hl", C.to(dtype) * dB, powers)
    return 2 * kernel.real if kernel.is_complex() else kernel


def s4d_recurrent_ref(
    u: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    D: torch.Tensor | None,
    method: str,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The discrete recurrence, one time step at a time:

        x_k = dA x_{k-1} + dB u_k,   y_k = C x_k (2 Re(C x_k) for complex A) + D u_k

    u: (batch, H, L)   A, B, C: (H, N)   dt, D: (H,)   initial_state: (batch, H, N)
    Returns y: (batch, H, L) in u's dtype and the last state x_L: (batch, H, N) in the mode dtype.
    """
    dA, dB = discretize(A, B, dt, method)
    dtype = dA.dtype
    real = real_dtype(dA)
    batch, channels, length = u.shape
    if initial_state is None:
        state = torch.zeros(batch, channels, A.shape[1], dtype=dtype, device=u.device)
    else:
        state = initial_state.to(dtype)
    C = C.to(dtype)
    u_c = u.to(real)
    outputs = []
    for k in range(length):
        state = dA * state + dB * u_c[:, :, k, None]
        y = (C * state).sum(dim=-1)
        outputs.append(2 * y.real if y.is_complex() else y)
    y = torch.stack(outputs, dim=-1) if outputs else u_c.clone()
    if D is not None:
        y = y + D.to(real)[:, None] * u_c
    return y.to(u.dtype), state


def s4d_conv_ref(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """Direct causal convolution y_t = sum_{j <= t} K[:, j] u[:, t - j] + D u_t, one output at a time.

    u: (batch, H, L)   K: (H, L_K) (taps beyond L_K are zero)   D: (H,)
    Returns y: (batch, H, L) in u's dtype. O(L^2): a reference, not a fast path.
    """
    dtype = real_dtype(u, K, D)
    u_c, K = u.to(dtype), K.to(dtype)
    outputs = []
    for t in range(u.shape[-1]):
        taps = min(t + 1, K.shape[-1])
        # u[t - j] for j = 0 .. taps - 1, i.e. the last `taps` inputs in reverse order.
        recent = u_c[:, :, t - taps + 1 : t + 1].flip(-1)
        outputs.append((K[:, :taps] * recent).sum(dim=-1))
    y = torch.stack(outputs, dim=-1) if outputs else u_c.clone()
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_c
    return y.to(u.dtype)
