"""(Gated) RMSNorm: ``rms_norm_gated`` (Mamba-2's gated, grouped norm), plain ``rms_norm``, and
``add_rms_norm`` (a pre-norm block's residual add fused with the next norm)."""

from ssmkit.ops.norm.interface import add_rms_norm, rms_norm, rms_norm_gated

__all__ = ["add_rms_norm", "rms_norm", "rms_norm_gated"]
