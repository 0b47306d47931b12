"""Public S4D functions: argument checks, initialisations, and ``s4d_forward``'s dispatch.

S4D (diagonal S4, Gu et al. 2022) per channel h: x' = A x + B u, y = C x + D u with diagonal A.
Shapes: A, B, C (H, N)   dt (H,) real step sizes   D (H,)   u (batch, H, L).

Conjugate-pair convention: a complex A holds one mode of each conjugate pair, so S4D-Lin with
state size N stores N/2 modes and the real output is y = 2 Re(C x) (kernel K = 2 Re(...)). A real
A (S4D-Real) is N real modes with y = C x. B and C may be real for complex A; for real A they
must be real.

Backends of ``s4d_forward``: ``"reference"`` runs the recurrence (``reference.py``), ``"torch"``
computes the Vandermonde kernel and convolves with an FFT (``fft.py``); the FFT path also serves
GPUs (cuFFT), there are no Triton kernels for S4D.
"""

from __future__ import annotations

import math

import torch

from ssmkit.ops import checks
from ssmkit.ops.dispatch import resolve
from ssmkit.ops.s4.fft import fft_conv_torch, s4d_kernel_factored
from ssmkit.ops.s4.reference import (
    discretize_bilinear_ref,
    discretize_zoh_ref,
    s4d_conv_ref,
    s4d_kernel_ref,
    s4d_recurrent_ref,
)

_OP = "ssmkit.ops.s4"
METHODS = ("zoh", "bilinear")
_SSM_DTYPES = checks.FLOAT_DTYPES + (torch.complex64, torch.complex128)


def _implementation(backend: str | None, device: torch.device) -> str:
    implementation = resolve(_OP, backend, device)
    if implementation == "triton":  # only reachable if someone adds ssmkit/ops/s4/triton
        raise NotImplementedError("ssmkit.ops.s4 has no Triton kernels; use backend 'torch' (FFT)")
    return implementation


def _check_ssm(A: object, B: object, dt: object, C: object = None, with_C: bool = False) -> None:
    """A, B, C: (H, N), complex or real (real A needs real B, C); dt: (H,) real."""
    A = checks.tensor("A", A)
    B = checks.tensor("B", B)
    dt = checks.tensor("dt", dt)
    checks.floating("A", A, _SSM_DTYPES)
    checks.shape("A", A, [("H", None), ("N", None)])
    H, N = A.shape
    named = {"B": B}
    if with_C:
        named["C"] = checks.tensor("C", C)
    for name, value in named.items():
        checks.floating(name, value, _SSM_DTYPES)
        checks.shape(name, value, [("H", H), ("N", N)])
        if value.is_complex() and not A.is_complex():
            raise TypeError(f"{name} must be real when A is real ({A.dtype}), got {value.dtype}")
    checks.floating("dt", dt)
    checks.shape("dt", dt, [("H", H)])
    checks.same_device("A", A, dt=dt, **named)


def _check_method(method: object) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_input(u: object, H: int, D: object) -> torch.Tensor:
    """u: (batch, H, L) real; D: (H,) real or None."""
    u = checks.tensor("u", u)
    checks.floating("u", u)
    checks.shape("u", u, [("batch", None), ("H", H), ("L", None)])
    D = checks.tensor("D", D, optional=True)
    if D is not None:
        checks.floating("D", D)
        checks.shape("D", D, [("H", H)])
    checks.same_device("u", u, D=D)
    return u


def discretize_zoh(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order-hold discretization of a diagonal SSM: dA = exp(dt A), dB = (dA - 1) / A * B.

    A, B: (H, N) complex or real (A nonzero)   dt: (H,) real
    Returns dA, dB: (H, N) in the mode dtype (complex64/128 for complex A, else fp32/fp64).
    """
    _check_ssm(A, B, dt)
    return discretize_zoh_ref(A, B, dt)


def discretize_bilinear(
    A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) discretization: dA = (1 + dt A/2) / (1 - dt A/2), dB = dt B / (1 - dt A/2).

    A, B: (H, N) complex or real   dt: (H,) real
    Returns dA, dB: (H, N) in the mode dtype.
    """
    _check_ssm(A, B, dt)
    return discretize_bilinear_ref(A, B, dt)


def s4d_kernel(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    length: int,
    method: str = "zoh",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Real convolution kernel of length ``length``: K[h, l] = sum_n C dB dA^l (2 Re(.) if complex).

    A, B, C: (H, N)   dt: (H,)   method: "zoh" or "bilinear"
    Returns K: (H, length), fp32 (fp64 for 64-bit inputs). The reference builds the (H, N, length)
    Vandermonde matrix; the fast path factors it (see ``fft.py``) and needs O(H N sqrt(length)).
    """
    _check_ssm(A, B, dt, C, with_C=True)
    _check_method(method)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    if _implementation(backend, A.device) == "reference":
        return s4d_kernel_ref(A, B, C, dt, length, method)
    return s4d_kernel_factored(A, B, C, dt, length, method)


def s4d_recurrent(
    u: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    D: torch.Tensor | None = None,
    method: str = "zoh",
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """S4D as a recurrence: x_k = dA x_{k-1} + dB u_k, y_k = C x_k (2 Re for complex A) + D u_k.

    u: (batch, H, L)   A, B, C: (H, N)   dt, D: (H,)   initial_state: (batch, H, N)
    Returns y: (batch, H, L) in u's dtype and, if return_state, the last state (batch, H, N) in
    the mode dtype (complex for complex A).
    """
    _check_ssm(A, B, dt, C, with_C=True)
    _check_method(method)
    u = _check_input(u, A.shape[0], D)
    checks.same_device("u", u, A=A)
    initial_state = checks.tensor("initial_state", initial_state, optional=True)
    if initial_state is not None:
        checks.floating("initial_state", initial_state, _SSM_DTYPES)
        checks.shape(
            "initial_state", initial_state, [("batch", u.shape[0]), ("H", A.shape[0]), ("N", A.shape[1])]
        )
        checks.same_device("u", u, initial_state=initial_state)
    y, state = s4d_recurrent_ref(u, A, B, C, dt, D, method, initial_state)
    return (y, state) if return_state else y


def _check_conv(u: object, K: object, D: object) -> torch.Tensor:
    K = checks.tensor("K", K)
    checks.floating("K", K)
    checks.shape("K", K, [("H", None), ("L", None)])
    u = _check_input(u, K.shape[0], D)
    checks.same_device("u", u, K=K)
    return u


def s4d_conv(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Direct causal convolution (the reference, O(L^2)): y_t = sum_{j<=t} K[:, j] u_{t-j} + D u_t.

    u: (batch, H, L)   K: (H, L_K) real   D: (H,). Returns y: (batch, H, L) in u's dtype.
    """
    u = _check_conv(u, K, D)
    return s4d_conv_ref(u, K, D)


def fft_conv(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution by FFT with zero padding to 2L (the fast path, O(L log L)).

    u: (batch, H, L)   K: (H, L_K) real (taps past L ignored)   D: (H,)
    Returns y: (batch, H, L) in u's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    u = _check_conv(u, K, D)
    return fft_conv_torch(u, K, D)


def s4d_forward(
    u: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    D: torch.Tensor | None = None,
    method: str = "zoh",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """S4D layer core from a zero state: the recurrence ("reference") or kernel + FFT ("torch").

    u: (batch, H, L)   A, B, C: (H, N)   dt, D: (H,)   method: "zoh" or "bilinear"
    Returns y: (batch, H, L) in u's dtype.
    """
    _check_ssm(A, B, dt, C, with_C=True)
    _check_method(method)
    u = _check_input(u, A.shape[0], D)
    checks.same_device("u", u, A=A)
    if _implementation(backend, u.device) == "reference":
        return s4d_recurrent_ref(u, A, B, C, dt, D, method, None)[0]
    return fft_conv_torch(u, s4d_kernel_factored(A, B, C, dt, u.shape[-1], method), D)


def s4d_lin_init(
    H: int, N: int, *, dtype: torch.dtype = torch.complex64, device: torch.device | str | None = None
) -> torch.Tensor:
    """S4D-Lin: A[h, n] = -1/2 + i pi n for n < N/2 (one mode per conjugate pair of an N-state system).

    Returns A: (H, N // 2) complex. N must be even.
    """
    if N <= 0 or N % 2:
        raise ValueError(f"N must be a positive even state size (N/2 conjugate pairs are kept), got {N}")
    if dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"dtype must be complex64 or complex128, got {dtype}")
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    n = torch.arange(N // 2, dtype=real, device=device)
    A = torch.complex(torch.full_like(n, -0.5), math.pi * n)
    return A.expand(H, N // 2).clone()


def s4d_real_init(
    H: int, N: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """S4D-Real: A[h, n] = -(n + 1), and the log form used as a parameter: A = -exp(A_log).

    Returns A, A_log: (H, N) real.
    """
    if N <= 0:
        raise ValueError(f"N must be positive, got {N}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    n = torch.arange(1, N + 1, dtype=dtype, device=device).expand(H, N).clone()
    return -n, torch.log(n)


def s4d_lin_system(
    H: int,
    N: int,
    *,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ready-to-run S4D-Lin system, initialised as in the S4D paper: A from :func:`s4d_lin_init`,
    B = 1, C ~ complex normal (variance 1/2 per part), dt log-uniform in [dt_min, dt_max].

    Returns A, B, C: (H, N // 2) complex64 and dt: (H,) float32.
    """
    A = s4d_lin_init(H, N, device=device)
    B = torch.ones_like(A)
    C = torch.randn(H, N // 2, dtype=torch.complex64, generator=generator).to(A.device)
    log_dt = torch.rand(H, generator=generator) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    return A, B, C, torch.exp(log_dt).to(A.device)
