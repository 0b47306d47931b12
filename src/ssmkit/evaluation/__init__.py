"""Evaluation: the reference-diff tool (:mod:`ssmkit.evaluation.compare`); tasks, perplexity and
long-context checks come later.

- :func:`compare_checkpoint` — our model vs ``transformers`` (or a dump), per layer, stage and token.
- :func:`run_ours`, :func:`run_transformers`, :func:`compare_stages`, :func:`save_dump`, :func:`load_dump`.
"""

from ssmkit.evaluation.compare import (
    CompareReport,
    StageDiff,
    compare_checkpoint,
    compare_stages,
    load_dump,
    run_ours,
    run_transformers,
    save_dump,
)

__all__ = [
    "CompareReport",
    "StageDiff",
    "compare_checkpoint",
    "compare_stages",
    "load_dump",
    "run_ours",
    "run_transformers",
    "save_dump",
]
