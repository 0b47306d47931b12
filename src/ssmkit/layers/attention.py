"""Multi-head causal self-attention with grouped key/value heads and optional rotary embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.state import KVState
from ssmkit.layers.tracing import record


@dataclass
class StaticKVState:
    """Keys and values preallocated to ``max_length`` positions: decoding writes in place and never
    reallocates, so a decode step keeps the same tensors from call to call (what a CUDA graph needs).

    key, value: (batch, num_kv_heads, max_length, head_dim); lengths: (batch,) int64, how many
    positions each row holds (rows may differ: prompts of different lengths). Positions at or beyond
    a row's length hold stale values and are masked out. Writing past ``max_length`` is an error
    (an index error on the CPU, a device-side assert on CUDA); callers size the cache up front.
    """

    key: torch.Tensor
    value: torch.Tensor
    lengths: torch.Tensor

    @property
    def max_length(self) -> int:
        return self.key.shape[2]

    def next_positions(self, seqlen: int) -> torch.Tensor:
        """positions: (batch, seqlen) int64, where the next ``seqlen`` tokens of each row go."""
        return self.lengths[:, None] + torch.arange(seqlen, device=self.lengths.device)

    def write(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """Store key, value: (batch, num_kv_heads, seqlen, head_dim) at positions (batch, seqlen) and
        advance the lengths; device-side only (no host synchronisation)."""
        batch, heads, seqlen, dim = key.shape
        index = positions[:, None, :, None].expand(batch, heads, seqlen, dim)
        self.key.scatter_(2, index, key.to(self.key.dtype))
        self.value.scatter_(2, index, value.to(self.value.dtype))
        self.lengths.add_(seqlen)

    def reset(self) -> None:
        self.lengths.zero_()

    def nbytes(self) -> int:
        return (
            2 * self.key.numel() * self.key.element_size()
            + self.lengths.numel() * self.lengths.element_size()
        )


def rotary_tables(
    positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (batch, seqlen, rotary_dim) for integer positions (batch, seqlen).

    Angles are computed in fp32 (fp64 when dtype is fp64), as the checkpoints we load were
    trained with: at long positions fp32 angles are off by ~1e-3 rad, and matching that matters."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.int64).to(dtype) / rotary_dim
    )
    angles = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of x: (batch, heads, seqlen, head_dim) in halves
    (the GPT-NeoX / Llama layout), in fp32."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot = rot if rot.dtype == torch.float64 else rot.float()
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    out = rot * cos[:, None].to(rot.dtype) + rotated * sin[:, None].to(rot.dtype)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class Attention(nn.Module):
    """Causal self-attention; heads share key/value heads in groups of num_heads // num_kv_heads.

    x: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model)
    Packed sequences (seq_idx) attend only within their own sequence and restart their positions.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rotary_dim: int = 0,
        rope_theta: float = 10000.0,
        softmax_scale: float | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary_dim, self.rope_theta = rotary_dim, rope_theta
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)

    def allocate_state(
        self, batch: int, *, dtype: torch.dtype, device: torch.device, max_length: int | None = None
    ) -> KVState | StaticKVState:
        """A growing KVState (empty) or, with ``max_length``, a StaticKVState of that many positions."""
        if max_length is None:
            empty = torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, dtype=dtype, device=device)
            return KVState(key=empty, value=empty.clone())
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        shape = (batch, self.num_kv_heads, max_length, self.head_dim)
        return StaticKVState(
            key=torch.zeros(shape, dtype=dtype, device=device),
            value=torch.zeros(shape, dtype=dtype, device=device),
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: KVState | StaticKVState | None = None,
        decode: bool = False,
    ) -> torch.Tensor:
        """x: (batch, seqlen, d_model); seq_idx: (batch, seqlen) int32 sequence number of each token
        of a packed batch; state: keys/values of earlier tokens (appended to). ``decode`` changes
        nothing here: one new token attending to the cached keys is the general path."""
        if isinstance(state, StaticKVState):
            if seq_idx is not None:
                raise ValueError("packed sequences (seq_idx) cannot continue from cached keys and values")
            return self._forward_static(x, state)
        batch, seqlen, _ = x.shape
        past = state.length if state is not None else 0
        if seq_idx is not None and past:
            raise ValueError("packed sequences (seq_idx) cannot continue from cached keys and values")
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)

        # Stages are recorded before the rotary embedding, where a checkpoint's q/k/v projections end.
        record(self, "q", q.transpose(1, 2))
        record(self, "k", k.transpose(1, 2))
        record(self, "v", v.transpose(1, 2))
        if self.rotary_dim > 0:
            positions = torch.arange(past, past + seqlen, device=x.device)[None].expand(batch, -1)
            if seq_idx is not None and cu_seqlens is not None:
                # Packed sequences restart at position 0: subtract each token's sequence start.
                positions = positions - cu_seqlens.to(positions.device)[seq_idx.long()]
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            cos, sin = rotary_tables(positions, self.rotary_dim, self.rope_theta, compute)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if state is not None:
            k, v = state.append(k, v)

        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if seq_idx is None and past == 0:
            # The plain causal case lets PyTorch pick its fused (flash / memory-efficient) kernel.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            total = k.shape[2]
            query_pos = torch.arange(past, past + seqlen, device=x.device)[:, None]
            mask = torch.arange(total, device=x.device)[None, :] <= query_pos  # (seqlen, total)
            if seq_idx is not None:
                mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        out = out.transpose(1, 2).reshape(batch, seqlen, self.num_heads * self.head_dim)
        record(self, "attn_out", out)
        y = self.out_proj(out)
        record(self, "out_proj", y)
        return y

    def _forward_static(self, x: torch.Tensor, state: StaticKVState) -> torch.Tensor:
        """Attention over a preallocated cache whose rows may hold different lengths. Positions come
        from the device-side lengths, never from the host, so the step can be captured in a CUDA graph.

        x: (batch, seqlen, d_model) -> (batch, seqlen, d_model)
        """
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        record(self, "q", q.transpose(1, 2))
        record(self, "k", k.transpose(1, 2))
        record(self, "v", v.transpose(1, 2))
        positions = state.next_positions(seqlen)  # (batch, seqlen)
        if self.rotary_dim > 0:
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            cos, sin = rotary_tables(positions, self.rotary_dim, self.rope_theta, compute)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        state.write(k, v, positions)

        # Fold the query heads that share a key/value head into the query axis, (batch, kv_heads,
        # groups * seqlen, head_dim): every group reads the cache once, instead of repeat_interleave
        # copying the whole preallocated cache groups times on every decode step.
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups * seqlen, self.head_dim)
        slots = torch.arange(state.max_length, device=x.device)
        visible = slots[None, None, :] <= positions[:, :, None]  # (batch, seqlen, max_length)
        mask = visible[:, None].expand(batch, groups, seqlen, state.max_length)
        mask = mask.reshape(batch, 1, groups * seqlen, state.max_length)
        out = F.scaled_dot_product_attention(
            q, state.key.to(q.dtype), state.value.to(q.dtype), attn_mask=mask, scale=self.softmax_scale
        )
        out = out.reshape(batch, self.num_heads, seqlen, self.head_dim).transpose(1, 2)
        out = out.reshape(batch, seqlen, self.num_heads * self.head_dim)
        record(self, "attn_out", out)
        y = self.out_proj(out)
        record(self, "out_proj", y)
        return y
