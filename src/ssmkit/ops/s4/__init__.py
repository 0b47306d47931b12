"""S4D (diagonal S4): discretizations, the convolution kernel, recurrent / direct / FFT forms."""

from ssmkit.ops.s4.interface import (
    METHODS,
    discretize_bilinear,
    discretize_zoh,
    fft_conv,
    s4d_conv,
    s4d_forward,
    s4d_kernel,
    s4d_lin_init,
    s4d_lin_system,
    s4d_real_init,
    s4d_recurrent,
)

__all__ = [
    "METHODS",
    "discretize_bilinear",
    "discretize_zoh",
    "fft_conv",
    "s4d_conv",
    "s4d_forward",
    "s4d_kernel",
    "s4d_lin_init",
    "s4d_lin_system",
    "s4d_real_init",
    "s4d_recurrent",
]
