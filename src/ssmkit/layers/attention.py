"""Multi-head causal self-attention with grouped key/value heads and optional rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.state import KVState
from ssmkit.layers.tracing import record


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

    def allocate_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> KVState:
        empty = torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, dtype=dtype, device=device)
        return KVState(key=empty, value=empty.clone())

    def forward(
        self,
        x: torch.Tensor,
        *,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: KVState | None = None,
        decode: bool = False,
    ) -> torch.Tensor:
        """x: (batch, seqlen, d_model); seq_idx: (batch, seqlen) int32 sequence number of each token
        of a packed batch; state: keys/values of earlier tokens (appended to). ``decode`` changes
        nothing here: one new token attending to the cached keys is the general path."""
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
