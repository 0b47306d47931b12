"""Layers that wire the operators of :mod:`ssmkit.ops` into modules; they never launch kernels.

- :class:`Mamba1Mixer`, :class:`Mamba2Mixer`, :class:`S4DLayer` — SSM mixers with ``allocate_state``
  and a ``decode=True`` one-token path.
- :class:`Attention` — grouped-KV multi-head attention, optional rotary embeddings.
- :class:`GatedMLP`, :class:`MixtureOfExperts`, :class:`FeedForward`; :class:`RMSNorm`,
  :class:`GatedRMSNorm`; :class:`Block` — pre-norm residual block (fp32 residual stream on request).
"""

from ssmkit.layers.attention import Attention
from ssmkit.layers.block import Block
from ssmkit.layers.mamba1 import Mamba1Mixer
from ssmkit.layers.mamba2 import Mamba2Mixer
from ssmkit.layers.mlp import FeedForward, GatedMLP, MixtureOfExperts
from ssmkit.layers.norm import GatedRMSNorm, RMSNorm
from ssmkit.layers.s4 import S4DLayer
from ssmkit.layers.state import KVState, SSMState

__all__ = [
    "Attention",
    "Block",
    "FeedForward",
    "GatedMLP",
    "GatedRMSNorm",
    "KVState",
    "Mamba1Mixer",
    "Mamba2Mixer",
    "MixtureOfExperts",
    "RMSNorm",
    "S4DLayer",
    "SSMState",
]
