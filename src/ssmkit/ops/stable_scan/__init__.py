"""Stable state scan: selective SSM with a full (d_state x d_state) transition and a LayerNorm of
the state after every update (the SSM of :class:`ssmkit.layers.grounded.StableStateSSM`).

- :mod:`.reference` — the step-by-step loop in PyTorch, the ground truth (fp64-capable, both
  discretisations).
- ``.triton`` — fused forward and backward kernels for the "euler" discretisation, imported only
  when that backend runs.
- :mod:`.interface` — :func:`stable_scan`, checks and dispatch.
"""

from ssmkit.ops.stable_scan.interface import stable_scan

__all__ = ["stable_scan"]
