"""ssmkit: selective state space models (S4, Mamba-1, Mamba-2, hybrids) for PyTorch.

The operators live in :mod:`ssmkit.ops`; they run on any device through a PyTorch fast path and
on CUDA GPUs through Triton kernels when Triton is installed. Nothing optional is imported here.
"""

__version__ = "0.1.0"
