"""Inference cache: one state per layer, plus how many tokens have been consumed.

SSM layers (Mamba-1, Mamba-2, S4) hold a conv window and an SSM state whose size does not depend
on the length; attention layers hold their keys and values. ``LanguageModel.allocate_cache``
builds one; ``LanguageModel.forward(..., cache=cache)`` reads and advances it: the first call
(the prompt) runs the chunked kernels from the stored state, later one-token calls run the step
kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssmkit.layers.state import KVState, SSMState


@dataclass
class InferenceCache:
    """states[i]: SSMState (conv (batch, channels, d_conv - 1), ssm (batch, ...)) or KVState
    (key, value (batch, kv_heads, length, head_dim)) for layer i."""

    states: list[SSMState | KVState]
    batch: int
    seqlen_offset: int = 0

    def reset(self) -> None:
        """Forget every sequence (zero the SSM states, empty the KV caches) without reallocating."""
        for state in self.states:
            state.reset()
        self.seqlen_offset = 0

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self.states)
