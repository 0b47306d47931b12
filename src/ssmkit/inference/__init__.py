"""Generation on any model that follows the ``ssmkit.models`` contract (``model(input_ids, cache=)``,
``model.layers[i].mixer.allocate_state``).

- :func:`generate` / :func:`stream` — prompts (one, a batch, or a list of different lengths) in,
  new tokens out (all at the end, or step by step); greedy or sampled (:class:`SamplingParams`).
- :func:`prefill` — the prompt through the chunked kernels, in chunks of bounded memory.
- :class:`DecodeRunner` — decode steps on a preallocated cache, replayed from CUDA graphs per
  batch-size bucket when possible (:func:`bucket_for`), eager otherwise.
- sampling filters: :func:`top_k_filter`, :func:`top_p_filter`, :func:`min_p_filter`,
  :func:`apply_repetition_penalty`, :func:`sample_next`.
"""

from ssmkit.inference.generate import GenerationOutput, as_prompts, generate, prefill, stream
from ssmkit.inference.graphs import BUCKETS, DecodeRunner, bucket_for, runner_for
from ssmkit.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "BUCKETS",
    "DecodeRunner",
    "GenerationOutput",
    "SamplingParams",
    "apply_repetition_penalty",
    "as_prompts",
    "bucket_for",
    "filter_logits",
    "generate",
    "min_p_filter",
    "prefill",
    "runner_for",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
]
