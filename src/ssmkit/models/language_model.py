"""``LanguageModel``: embedding, a stack of blocks chosen per layer, final norm, LM head."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.layers.attention import Attention
from ssmkit.layers.block import Block
from ssmkit.layers.grounded import GroundedMixer
from ssmkit.layers.mamba1 import Mamba1Mixer
from ssmkit.layers.mamba2 import Mamba2Mixer
from ssmkit.layers.mlp import FeedForward
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.s4 import S4DLayer
from ssmkit.layers.tracing import record
from ssmkit.models.cache import InferenceCache
from ssmkit.models.config import ModelConfig

if TYPE_CHECKING:  # inference sits above models: imported for the annotations only
    from ssmkit.inference import GenerationOutput


@dataclass
class LMOutput:
    """logits: (batch, seqlen, vocab_size) (the unpadded vocabulary); loss: scalar or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def build_mixer(config: ModelConfig, kind: str) -> nn.Module:
    """The mixer of one layer of type ``kind`` (one of ``LAYER_TYPES``)."""
    d = config.d_model
    if kind == "mamba1":
        m = config.mamba1
        return Mamba1Mixer(
            d,
            d_state=m.d_state,
            d_conv=m.d_conv,
            expand=m.expand,
            dt_rank=config.mamba1_dt_rank,
            conv_bias=m.conv_bias,
            proj_bias=m.proj_bias,
            dt_min=m.dt_min,
            dt_max=m.dt_max,
            dt_init=m.dt_init,
            dt_scale=m.dt_scale,
            dt_init_floor=m.dt_init_floor,
        )
    if kind == "mamba2":
        m = config.mamba2
        return Mamba2Mixer(
            d,
            d_state=m.d_state,
            d_conv=m.d_conv,
            expand=m.expand,
            headdim=m.headdim,
            ngroups=m.ngroups,
            chunk_size=m.chunk_size,
            conv_bias=m.conv_bias,
            proj_bias=m.proj_bias,
            dt_min=m.dt_min,
            dt_max=m.dt_max,
            dt_init_floor=m.dt_init_floor,
            dt_limit=tuple(m.dt_limit),
            norm_before_gate=m.norm_before_gate,
            norm_eps=m.norm_eps if m.norm_eps is not None else config.norm_eps,
        )
    if kind == "attention":
        a = config.attention
        head_dim = config.attention_head_dim
        return Attention(
            d,
            a.num_heads,
            config.attention_kv_heads,
            head_dim,
            rotary_dim=head_dim if a.rotary_dim is None else a.rotary_dim,
            rope_theta=a.rope_theta,
            softmax_scale=a.softmax_scale,
            bias=a.bias,
        )
    if kind == "grounded":
        g = config.grounded
        kwargs = dataclasses.asdict(g)
        kwargs["dt_bias_init"] = tuple(g.dt_bias_init)
        kwargs["norm_eps"] = g.norm_eps if g.norm_eps is not None else config.norm_eps
        return GroundedMixer(d, **kwargs)
    if kind == "s4":
        s = config.s4
        return S4DLayer(d, d_state=s.d_state, dt_min=s.dt_min, dt_max=s.dt_max, init=s.init)
    raise ValueError(f"unknown layer type {kind!r}")


class LanguageModel(nn.Module):
    """A causal language model over a per-layer pattern of mixers.

    forward(input_ids: (batch, seqlen) int) -> LMOutput with logits (batch, seqlen, vocab_size).
    Parameter names: ``embedding.weight``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``,
    ``layers.{i}.norm2.weight``, ``layers.{i}.mlp.*``, ``norm_f.weight``, ``lm_head.weight`` (absent
    when tied to the embedding).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList()
        for i, kind in enumerate(config.layer_types):
            mlp = None
            if config.has_mlp(i):
                m = config.mlp
                mlp = FeedForward(
                    config.d_model,
                    m.d_intermediate,
                    bias=m.bias,
                    num_experts=m.num_experts,
                    experts_per_token=m.experts_per_token,
                    expert_intermediate=m.expert_intermediate,
                )
            block = Block(
                config.d_model,
                build_mixer(config, kind),
                mlp=mlp,
                norm_eps=config.norm_eps,
                residual_in_fp32=config.residual_in_fp32,
                residual_multiplier=config.residual_multiplier,
                dropout=config.dropout,
            )
            for module in block.modules():
                module.trace_prefix = f"layers.{i}"
            self.layers.append(block)
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        )
        self.reset_parameters()

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding ~ N(0, initializer_range); linear biases zero (dt_proj's keeps its inverse-softplus
        dt); mixer and MLP output projections divided by sqrt(n_layer) when ``rescale_prenorm_residual``
        (GPT-2's scheme, as in the Mamba code), so the residual stream's variance does not grow with depth."""
        c = self.config
        nn.init.normal_(self.embedding.weight, std=c.initializer_range)
        for module in self.modules():
            if (
                isinstance(module, nn.Linear)
                and module.bias is not None
                and not getattr(module.bias, "_no_reinit", False)
            ):
                nn.init.zeros_(module.bias)
        if c.rescale_prenorm_residual:
            scale = 1.0 / math.sqrt(c.n_layer)
            for block in self.layers:
                for name in ("out_proj", "fc2"):
                    for module_name, module in block.named_modules():
                        if module_name.endswith(name) and isinstance(module, nn.Linear):
                            module.weight.mul_(scale)

    # ---------------------------------------------------------------- sizes
    def num_parameters(self, *, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - (self.embedding.weight.numel() if exclude_embedding else 0)

    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    # ---------------------------------------------------------------- inference state
    def allocate_cache(self, batch: int, *, dtype: torch.dtype | None = None) -> InferenceCache:
        """An empty cache for ``batch`` sequences, on the parameters' device."""
        weight = self.embedding.weight
        dtype = dtype or weight.dtype
        states = [
            block.mixer.allocate_state(batch, dtype=dtype, device=weight.device) for block in self.layers
        ]
        return InferenceCache(states=states, batch=batch)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
    ) -> LMOutput:
        """input_ids: (batch, seqlen) int; labels: (batch, seqlen) int, -100 ignored, shifted inside
        (labels = input_ids trains next-token prediction); cu_seqlens: (num_seqs + 1,) int32 boundaries
        of sequences packed into a batch of one, giving exactly what separate calls give; cache: an
        :class:`InferenceCache`, read and advanced (one new token per call runs the decode kernels).

        Returns LMOutput(logits (batch, seqlen, vocab_size), loss or None).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must have an integer dtype (int32, int64), got {input_ids.dtype}")
        batch, seqlen = input_ids.shape
        if seqlen == 0 or batch == 0:
            raise ValueError(
                f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}"
            )
        seq_idx = None
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError(
                    "cu_seqlens and cache cannot be combined: decode packed sequences one by one"
                )
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen, batch)
        decode = False
        if cache is not None:
            if cache.batch != batch:
                raise ValueError(f"cache holds {cache.batch} sequences, input_ids has batch {batch}")
            decode = cache.seqlen_offset > 0 and seqlen == 1

        hidden = self.embedding(input_ids)
        if self.config.embedding_multiplier != 1.0:
            hidden = hidden * self.config.embedding_multiplier
        if self.config.dropout > 0 and self.training:
            hidden = F.dropout(hidden, self.config.dropout, training=True)
        record(None, "embedding", hidden)
        for i, block in enumerate(self.layers):
            hidden = block(
                hidden,
                seq_idx=seq_idx,
                cu_seqlens=cu_seqlens,
                state=cache.states[i] if cache is not None else None,
                decode=decode,
            )
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        record(None, "final_norm", hidden)
        logits = F.linear(hidden, self.head_weight())
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        logits = logits[..., : self.config.vocab_size]
        record(None, "logits", logits)
        if cache is not None:
            cache.seqlen_offset += seqlen

        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, seq_idx)
        return LMOutput(logits=logits, loss=loss)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: torch.Tensor | list, **kwargs: Any) -> GenerationOutput:
        """Continue prompts (input_ids (batch, seqlen) or a list of prompts of any lengths); see
        :func:`ssmkit.inference.generate` for the arguments and the returned GenerationOutput."""
        from ssmkit.inference import generate

        return generate(self, prompts, **kwargs)

    def stream(self, prompts: torch.Tensor | list, **kwargs: Any) -> Iterator[list[int | None]]:
        """Yield each step's new tokens; see :func:`ssmkit.inference.stream`."""
        from ssmkit.inference import stream

        return stream(self, prompts, **kwargs)

    # ---------------------------------------------------------------- Hugging Face checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> LanguageModel:
        """Load a local Hugging Face checkpoint folder (``mamba``, ``mamba2``, ``granitemoehybrid``)."""
        from ssmkit.models.hf import load_pretrained

        return load_pretrained(path, dtype=dtype)

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write a Hugging Face checkpoint folder that ``transformers`` loads back."""
        from ssmkit.models.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int, batch: int) -> torch.Tensor:
    """seq_idx: (1, seqlen) int32, the packed sequence each position belongs to."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "cu_seqlens must be an int32/int64 tensor of shape (num_seqs + 1,), got "
            f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
        )
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens given) need batch size 1, got batch {batch}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seqlen:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at seqlen ({seqlen}), got {int(cu_seqlens[0])} .. "
            f"{int(cu_seqlens[-1])}"
        )
    positions = torch.arange(seqlen, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True).to(torch.int32)[None]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """Mean cross entropy of logits[t] against labels[t + 1]; -100 labels, and targets that belong to
    the next packed sequence, are ignored.

    logits: (batch, seqlen, vocab)   labels: (batch, seqlen)   seq_idx: (batch, seqlen) or None
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape (batch, seqlen) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    targets = labels[:, 1:].long()
    if seq_idx is not None:
        targets = targets.masked_fill(seq_idx[:, 1:] != seq_idx[:, :-1], -100)
    # Cross entropy in fp32 (fp64 stays fp64): log-softmax over a large vocabulary in bf16 is too coarse.
    logits = logits[:, :-1] if logits.dtype == torch.float64 else logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
