"""Causal depthwise conv1d (``causal_conv1d_fn``) and its decode step (``causal_conv1d_update``)."""

from ssmkit.ops.conv1d.interface import causal_conv1d_fn, causal_conv1d_update

__all__ = ["causal_conv1d_fn", "causal_conv1d_update"]
