"""(Gated) RMSNorm: ``rms_norm_gated`` (Mamba-2's gated, grouped norm) and plain ``rms_norm``."""

from ssmkit.ops.norm.interface import rms_norm, rms_norm_gated

__all__ = ["rms_norm", "rms_norm_gated"]
