"""Inference cache: one state per layer, plus how many tokens have been consumed.

SSM layers (Mamba-1, Mamba-2, S4) hold a conv window and an SSM state whose size does not depend
on the length; attention layers hold their keys and values, either growing by concatenation
(:class:`KVState`) or preallocated to a maximum length (:class:`StaticKVState`, what CUDA-graph
decoding needs: no tensor is reallocated while decoding). ``LanguageModel.allocate_cache`` builds a
growing one, :meth:`InferenceCache.allocate` either kind; ``LanguageModel.forward(..., cache=cache)``
reads and advances it: the first call (the prompt) runs the chunked kernels from the stored state,
later one-token calls run the step kernels.

Row operations (:meth:`~InferenceCache.select`, :meth:`~InferenceCache.reorder_`,
:meth:`~InferenceCache.copy_rows_`) serve beam search, dropping finished sequences and assembling a
batch from prompts prefilled separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ssmkit.layers.attention import Attention, StaticKVState
from ssmkit.layers.state import KVState, SSMState

# SSMState, KVState, StaticKVState, or another mixer's fixed-size state dataclass (tensor fields with
# the batch first, reset(), nbytes()), such as the grounded layer's GroundedState.
LayerState = SSMState | KVState | StaticKVState | object


@dataclass
class CacheMemory:
    """Bytes held by a cache, by kind: conv windows and SSM states (fixed whatever the length), and
    keys/values (growing with the length, or preallocated to ``max_length``)."""

    conv: int
    ssm: int
    kv: int

    @property
    def recurrent(self) -> int:
        """conv + ssm: the part that does not depend on the number of tokens."""
        return self.conv + self.ssm

    @property
    def total(self) -> int:
        return self.conv + self.ssm + self.kv


def _tensor_fields(state) -> dict[str, torch.Tensor]:
    """The tensor fields of a layer state dataclass (SSMState, a mixer's own fixed-size state, ...)."""
    return {
        f.name: getattr(state, f.name)
        for f in dataclasses.fields(state)
        if isinstance(getattr(state, f.name), torch.Tensor)
    }


def _state_tensors(state: LayerState) -> list[torch.Tensor]:
    if isinstance(state, StaticKVState):
        return [state.key, state.value, state.lengths]
    if isinstance(state, KVState):
        return [state.key, state.value]
    return list(_tensor_fields(state).values())


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class InferenceCache:
    """states[i]: SSMState (conv (batch, channels, d_conv - 1), ssm (batch, ...)), KVState (key,
    value (batch, kv_heads, length, head_dim)) or StaticKVState (key, value (batch, kv_heads,
    max_length, head_dim), lengths (batch,)) for layer i.

    seqlen_offset: tokens consumed (the longest row when rows differ); the model takes the
    one-token decode path when it is positive. max_length: the preallocated KV length, None when
    the KV caches grow (or the model has no attention layer and it was not asked for).
    """

    states: list[LayerState]
    batch: int
    seqlen_offset: int = 0
    max_length: int | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def allocate(
        cls,
        model: nn.Module,
        batch: int,
        *,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> InferenceCache:
        """An empty cache for ``batch`` sequences of ``model`` (a LanguageModel: ``model.layers[i].mixer``
        has ``allocate_state``). With ``max_length`` the attention layers get keys/values preallocated
        to that many positions; without, growing ones. dtype/device default to the embedding's."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        weight = model.embedding.weight
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        states = []
        for block in model.layers:
            mixer = block.mixer
            if isinstance(mixer, Attention):
                states.append(mixer.allocate_state(batch, dtype=dtype, device=device, max_length=max_length))
            else:
                states.append(mixer.allocate_state(batch, dtype=dtype, device=device))
        return cls(states=states, batch=batch, max_length=max_length)

    # ---------------------------------------------------------------- whole-cache operations
    def reset(self) -> None:
        """Forget every sequence (zero the SSM states, empty the KV caches) without reallocating."""
        for state in self.states:
            state.reset()
        self.seqlen_offset = 0

    def copy(self) -> InferenceCache:
        """An independent deep copy (new tensors, same contents)."""
        return self._map_rows(lambda t: t.clone(), self.batch)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, in a fixed order (identity checks, CUDA-graph bookkeeping)."""
        return [t for state in self.states for t in _state_tensors(state)]

    # ---------------------------------------------------------------- memory
    def memory(self) -> CacheMemory:
        conv = ssm = kv = 0
        for state in self.states:
            if isinstance(state, SSMState):
                conv += _nbytes(state.conv)
                ssm += _nbytes(state.ssm)
            elif isinstance(state, (KVState, StaticKVState)):
                kv += state.nbytes()
            else:  # another mixer's fixed-size state: recurrent, counted with the SSM states
                ssm += state.nbytes()
        return CacheMemory(conv=conv, ssm=ssm, kv=kv)

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self.states)

    # ---------------------------------------------------------------- rows
    def _index(self, indices: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
        device = self.tensors()[0].device
        index = torch.as_tensor(indices, dtype=torch.int64, device=device)
        if index.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of row numbers, got shape {tuple(index.shape)}")
        return index

    def _check_rows(self, index: torch.Tensor, name: str) -> None:
        # Host check: row operations run between calls (never inside a captured decode step).
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch):
            raise ValueError(f"{name} must hold row numbers in 0..{self.batch - 1}, got {index.tolist()}")

    def _map_rows(self, fn, batch: int) -> InferenceCache:
        """A new cache whose tensors are fn(tensor), holding ``batch`` rows."""
        states: list[LayerState] = []
        for state in self.states:
            if isinstance(state, StaticKVState):
                states.append(
                    StaticKVState(key=fn(state.key), value=fn(state.value), lengths=fn(state.lengths))
                )
            elif isinstance(state, KVState):
                states.append(KVState(key=fn(state.key), value=fn(state.value)))
            else:  # fixed-size recurrent states: every tensor field has the batch first
                fields = {name: fn(t) for name, t in _tensor_fields(state).items()}
                states.append(dataclasses.replace(state, **fields))
        return InferenceCache(
            states, batch=batch, seqlen_offset=self.seqlen_offset, max_length=self.max_length
        )

    def select(self, indices: Sequence[int] | torch.Tensor) -> InferenceCache:
        """A new cache holding rows ``indices`` of this one, in that order (drop finished sequences,
        or duplicate a prompt's state for several continuations)."""
        index = self._index(indices, "indices")
        self._check_rows(index, "indices")
        if index.numel() == 0:
            raise ValueError("indices must select at least one row")
        return self._map_rows(lambda t: t.index_select(0, index), index.numel())

    def reorder_(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Row i becomes old row indices[i], in place: every tensor keeps its identity (beam search
        inside a captured decode loop). indices: (batch,) int."""
        index = self._index(indices, "indices")
        if index.numel() != self.batch:
            raise ValueError(f"indices must have shape (batch,) = ({self.batch},), got {tuple(index.shape)}")
        self._check_rows(index, "indices")
        for state in self.states:
            if isinstance(state, KVState):  # growing: rebound anyway at the next append
                state.key, state.value = state.key.index_select(0, index), state.value.index_select(0, index)
                continue
            for tensor in _state_tensors(state):
                tensor.copy_(tensor.index_select(0, index))

    def copy_rows_(self, rows: Sequence[int] | torch.Tensor, source: InferenceCache) -> None:
        """Write every row of ``source`` into rows ``rows`` of this cache, in place (tensors keep their
        identity). Used to assemble a batch from prompts prefilled apart: a growing source KV of length
        L fills positions 0..L-1 of a preallocated one. rows: (source.batch,) int."""
        index = self._index(rows, "rows")
        if index.numel() != source.batch:
            raise ValueError(
                f"rows must have shape (source.batch,) = ({source.batch},), got {tuple(index.shape)}"
            )
        self._check_rows(index, "rows")
        if len(source.states) != len(self.states):
            raise ValueError(f"source has {len(source.states)} layer states, this cache {len(self.states)}")
        for layer, (mine, theirs) in enumerate(zip(self.states, source.states)):
            if type(mine) is type(theirs) and not isinstance(mine, (KVState, StaticKVState)):
                for name, tensor in _tensor_fields(mine).items():
                    tensor.index_copy_(0, index, getattr(theirs, name).to(tensor.dtype))
            elif isinstance(mine, StaticKVState) and isinstance(theirs, (KVState, StaticKVState)):
                length = theirs.length if isinstance(theirs, KVState) else theirs.max_length
                if length > mine.max_length:
                    raise ValueError(
                        f"layer {layer}: source holds {length} positions, more than this cache's "
                        f"max_length ({mine.max_length})"
                    )
                mine.key[:, :, :length].index_copy_(0, index, theirs.key.to(mine.key.dtype))
                mine.value[:, :, :length].index_copy_(0, index, theirs.value.to(mine.value.dtype))
                lengths = torch.full_like(index, length) if isinstance(theirs, KVState) else theirs.lengths
                mine.lengths.index_copy_(0, index, lengths.to(mine.lengths.device))
            elif isinstance(mine, KVState) and isinstance(theirs, KVState):
                if theirs.length != mine.length:
                    raise ValueError(
                        f"layer {layer}: a growing KV cache holds one length for all rows; source rows have "
                        f"{theirs.length} positions, this cache {mine.length} (allocate with max_length)"
                    )
                mine.key.index_copy_(0, index, theirs.key.to(mine.key.dtype))
                mine.value.index_copy_(0, index, theirs.value.to(mine.value.dtype))
            else:
                raise ValueError(
                    f"layer {layer}: cannot copy a {type(theirs).__name__} into a {type(mine).__name__}"
                )
        self.seqlen_offset = max(self.seqlen_offset, source.seqlen_offset)
