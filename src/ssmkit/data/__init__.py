"""Training data: tokenizers, token streams (in memory or memory-mapped) and packed batches.

- :mod:`ssmkit.data.text` — character-level and BPE tokenizers, or a checkpoint folder's.
- :mod:`ssmkit.data.tokens` — :class:`TokenStream`, ``.npy``/``.bin`` token files.
- :mod:`ssmkit.data.packing` — :class:`WindowLoader`: deterministic, resumable, packed batches.
"""

from __future__ import annotations

import os
from pathlib import Path

from ssmkit.data.packing import Batch, WindowLoader, evaluation_batches, pack_windows, stack_windows
from ssmkit.data.text import (
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    split_documents,
)
from ssmkit.data.tokens import TokenStream, encode_documents, open_tokens, write_tokens


def text_stream(
    path: str | os.PathLike,
    *,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    doc_separator: str | None = None,
) -> tuple[TokenStream, CharTokenizer | HFTokenizer]:
    """Tokenize a UTF-8 text file into one stream; documents (split on ``doc_separator``) end with
    the tokenizer's end-of-text id when it has one (a character tokenizer gets one only when the
    text has several documents)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    documents = split_documents(path.read_text(encoding="utf-8"), doc_separator)
    tok = build_tokenizer(tokenizer, documents, vocab_size=vocab_size, add_eos=doc_separator is not None)
    stream = encode_documents(tok.encode, documents, vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    return stream, tok


__all__ = [
    "Batch",
    "CharTokenizer",
    "HFTokenizer",
    "TokenStream",
    "Tokenizer",
    "WindowLoader",
    "build_tokenizer",
    "encode_documents",
    "evaluation_batches",
    "load_tokenizer",
    "open_tokens",
    "pack_windows",
    "split_documents",
    "stack_windows",
    "text_stream",
    "write_tokens",
]
