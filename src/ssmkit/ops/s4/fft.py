"""Fast path of S4D: a factored Vandermonde kernel and the FFT convolution (zero padding to 2L).

Kernel. K[l] = sum_n W_n z_n^l with W = C dB and z = dA. Writing l = q M + r (M ~ sqrt(L)):

    K[q M + r] = sum_n (W_n z_n^(q M)) z_n^r

is, per channel, a (L/M, N) @ (N, M) matrix product. Only N (M + L/M) powers are evaluated instead
of N L, and the (H, N, L) tensor of the plain Vandermonde form (``reference.py``) is never built:
on CPUs the complex exponentials dominate the plain form's time, and for H = 1024, N = 32,
L = 4096 its powers alone take 1 GiB. For complex modes the product is taken in real arithmetic
(the real part only, over 2N terms), and the powers in polar form from real exp, cos and sin;
powers too small to matter are floored before they become subnormal (see ``_LOG_FLOOR``).

Convolution. Padding both signals to 2L makes the FFT's circular convolution equal the linear one
on the first L outputs, which are exactly the causal ones.
"""

from __future__ import annotations

import math

import torch

from ssmkit.ops.s4.reference import discretize, real_dtype

# Log-magnitudes of powers below this are raised to it: exp() of very negative numbers returns
# subnormal numbers (below ~1e-38 in fp32), and arithmetic on them, here the matrix product, runs
# an order of magnitude slower on CPUs; a power of magnitude exp(-60) ~ 9e-27 (fp32) or
# exp(-600) ~ 3e-261 (fp64) is already zero next to the kernel's other terms. (With S4D-Lin's
# dt up to 0.1, |z|^l reaches exp(-400) at l = 8192.)
_LOG_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}


def s4d_kernel_factored(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, length: int, method: str
) -> torch.Tensor:
    """Same kernel as ``reference.s4d_kernel_ref``: A, B, C (H, N), dt (H,) -> K (H, length) real."""
    dA, dB = discretize(A, B, dt, method)
    dtype = dA.dtype
    channels = A.shape[0]
    inner = max(1, math.isqrt(max(length - 1, 0)) + 1)  # M, so that M * outer >= length
    outer = -(-length // inner)  # ceil(length / M)
    real = real_dtype(dA)
    low = torch.arange(inner, device=A.device, dtype=real)  # r
    high = torch.arange(outer, device=A.device, dtype=real) * inner  # q M
    weights = C.to(dtype) * dB  # (H, N)
    floor = _LOG_FLOOR[real]
    if dA.is_complex():
        # K = 2 Re(sum_n z^(qM) (W z^r)) is a real matrix product over 2N terms,
        # Re(z^(qM)) Re(2 W z^r) - Im(z^(qM)) Im(2 W z^r): half the arithmetic of the complex
        # product, and CPUs run real matrix products several times faster. The powers come from
        # z^l = exp(l log z) in polar form, exp and cos/sin of real arguments (vectorised on CPUs,
        # unlike complex exp): ZOH has log z = dt A exactly; bilinear takes the principal log of dA.
        # Every elementwise step runs along the long axis (M or L/M positions), not along N.
        log_z = dt.to(dtype)[:, None] * A.to(dtype) if method == "zoh" else torch.log(dA)
        rate, angle = log_z.real[:, :, None], log_z.imag[:, :, None]  # (H, N, 1)
        w_re, w_im = 2 * weights.real[:, :, None], 2 * weights.imag[:, :, None]  # K's factor 2
        if torch.is_grad_enabled() and any(t.requires_grad for t in (A, B, C, dt)):
            left, right = _complex_factors(rate, angle, w_re, w_im, low, high, floor)
        else:
            left, right = _complex_factors_inplace(rate, angle, w_re, w_im, low, high, floor)
    else:
        if method == "zoh":
            # z^l = exp(l dt A): exact and stable, and never forms dA^l by repeated products.
            log_z = (dt.to(dtype)[:, None] * A.to(dtype))[:, :, None]
            right = torch.exp((log_z * low).clamp(min=floor))  # (H, N, M)
            high_powers = torch.exp((log_z * high).clamp(min=floor))  # (H, N, L/M)
        else:
            # Bilinear dA may be negative for real A: powers, not logarithms (subnormal powers are
            # flushed to zero, for the floor's reason).
            tiny = torch.finfo(real).tiny
            right = dA[:, :, None] ** low
            right = torch.where(right.abs() < tiny, 0.0, right)
            high_powers = dA[:, :, None] ** high
            high_powers = torch.where(high_powers.abs() < tiny, 0.0, high_powers)
        left = (weights[:, :, None] * high_powers).transpose(1, 2)  # (H, L/M, N)
    kernel = torch.matmul(left, right)  # (H, L/M, M)
    return kernel.reshape(channels, outer * inner)[:, :length]


def _complex_factors(
    rate: torch.Tensor,
    angle: torch.Tensor,
    w_re: torch.Tensor,
    w_im: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the complex kernel, differentiable: left (H, L/M, 2N) holds
    [Re(z^(qM)), -Im(z^(qM))], right (H, 2N, M) holds [Re(2 W z^r); Im(2 W z^r)].
    rate, angle: Re and Im of log z, (H, N, 1); w_re, w_im: 2W, (H, N, 1)."""
    low_abs = torch.exp((rate * low).clamp(min=floor))  # |z^r|: (H, N, M)
    low_angle = angle * low
    low_re, low_im = low_abs * torch.cos(low_angle), low_abs * torch.sin(low_angle)
    right = torch.cat(
        [torch.addcmul(w_re * low_re, w_im, low_im, value=-1), torch.addcmul(w_re * low_im, w_im, low_re)],
        dim=1,
    )
    high_abs = torch.exp((rate * high).clamp(min=floor))  # |z^(qM)|: (H, N, L/M)
    high_angle = angle * high
    left = torch.cat([high_abs * torch.cos(high_angle), high_abs * -torch.sin(high_angle)], dim=1)
    return left.transpose(1, 2), right


def _complex_factors_inplace(
    rate: torch.Tensor,
    angle: torch.Tensor,
    w_re: torch.Tensor,
    w_im: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`_complex_factors` without autograd: written in place into the two factors,
    which saves a dozen (H, N, sqrt(L))-sized temporaries (a third of the time at L = 8192)."""
    channels, modes = rate.shape[:2]
    right = torch.empty(channels, 2 * modes, low.numel(), dtype=rate.dtype, device=rate.device)
    re, im = right[:, :modes], right[:, modes:]
    low_abs = torch.mul(rate, low).clamp_(min=floor).exp_()
    low_angle = angle * low
    torch.cos(low_angle, out=re).mul_(low_abs)
    torch.sin(low_angle, out=im).mul_(low_abs)
    # (re, im) <- (w_re re - w_im im, w_re im + w_im re)
    re_w_im = re * w_im
    re.mul_(w_re).addcmul_(im, w_im, value=-1)
    im.mul_(w_re).add_(re_w_im)
    left = torch.empty(channels, 2 * modes, high.numel(), dtype=rate.dtype, device=rate.device)
    high_abs = torch.mul(rate, high).clamp_(min=floor).exp_()
    high_angle = angle * high
    torch.cos(high_angle, out=left[:, :modes]).mul_(high_abs)
    torch.sin(high_angle, out=left[:, modes:]).mul_(high_abs).neg_()
    return left.transpose(1, 2), right


def fft_conv_torch(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """y = causal_conv(u, K) + D u.

    u: (batch, H, L)   K: (H, L_K) (taps beyond L are ignored, missing taps are zero)   D: (H,)
    Returns y: (batch, H, L) in u's dtype; computed in fp32 (fp64 for fp64 inputs).
    """
    dtype = real_dtype(u, K, D)
    length = u.shape[-1]
    n = 2 * length
    u_c = u.to(dtype)
    u_f = torch.fft.rfft(u_c, n=n)
    k_f = torch.fft.rfft(K[:, :length].to(dtype), n=n)
    # The product overwrites u's spectrum unless autograd needs it (saves a spectrum-sized buffer).
    in_place = not (torch.is_grad_enabled() and (u_f.requires_grad or k_f.requires_grad))
    y = torch.fft.irfft(u_f.mul_(k_f) if in_place else u_f * k_f, n=n)[..., :length]
    if D is not None:
        y = torch.addcmul(y, D.to(dtype)[:, None], u_c)
    return y.to(u.dtype)
