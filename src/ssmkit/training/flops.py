"""Training FLOPs per token (for MFU) and the peak FLOP/s of known accelerators.

The count is the usual ``6 * parameters`` (forward 2, backward 4 multiply-adds per weight per
token; embedding lookups excluded, the output head included) plus, per layer, the sequence-mixing
work that has no weight:

- attention, causal: QK^T and AV cost 2 * 2 * d_attn * L / 2 forward per token (half the score
  matrix is masked), times 3 for training;
- Mamba-2 (SSD, chunk size Q): intra-chunk C B^T (2 * Q/2 * g * n) and its product with x
  (2 * Q/2 * h * p), chunk states and their output (2 * 2 * h * p * n), times 3;
- Mamba-1 (selective scan): about 9 * d_inner * d_state forward per token (discretise, update,
  read out: the paper's count), times 3;
- S4D: the FFT convolution, about 3 FFTs of length 2L per channel, 3 * 5 * 2 log2(2L) * d per
  token forward, times 3.

It is an estimate for comparing models trained by the same loop, not a profiler count.
"""

from __future__ import annotations

import math

from torch import nn

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100 SXM": 989.5e12,
    "H100 80GB HBM3": 989.5e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.5e12,
    "A100": 312.0e12,
    "L40S": 362.05e12,
    "A10G": 70.0e12,
    "RTX 4090": 165.2e12,
}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device by name, or None when unknown (CPUs included)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def mixer_flops_per_token(config, seqlen: int) -> float:
    """Training FLOPs per token of the weight-free sequence mixing, summed over layers."""
    total = 0.0
    for kind in config.layer_types:
        if kind == "attention":
            d_attn = config.attention.num_heads * config.attention_head_dim
            total += 3 * 2 * d_attn * seqlen
        elif kind == "mamba2":
            m = config.mamba2
            h, p, n, g = config.mamba2_nheads, m.headdim, m.d_state, m.ngroups
            q = min(m.chunk_size, seqlen)
            total += 3 * (q * g * n + q * h * p + 4 * h * p * n)
        elif kind == "mamba1":
            total += 3 * 9 * config.mamba1.expand * config.d_model * config.mamba1.d_state
        elif kind == "s4":
            total += 3 * 3 * 5 * 2 * math.log2(2 * max(seqlen, 1)) * config.d_model
    return total


def flops_per_token(model: nn.Module, seqlen: int) -> float:
    """Training (forward + backward) FLOPs per token of ``model`` at sequence length ``seqlen``."""
    params = 0
    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.add(id(module.weight))
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    for param in model.parameters():
        if id(param) in embedding_ids and not tied:
            continue  # a lookup, not a matmul (a tied embedding is also the head's matmul)
        params += param.numel()
    config = getattr(model, "config", None)
    extra = (
        mixer_flops_per_token(config, seqlen)
        if config is not None and hasattr(config, "layer_types")
        else 0.0
    )
    return 6.0 * params + extra
