"""One decode step of a selective SSM (``selective_state_update``), Mamba-1 and Mamba-2 layouts."""

from ssmkit.ops.step.interface import selective_state_update

__all__ = ["selective_state_update"]
