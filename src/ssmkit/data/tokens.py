"""Token streams: documents concatenated into one array of token ids, each document ended by the
end-of-text id, held in memory or memory-mapped from a file.

Files are ``.npy`` (any integer dtype; read with ``mmap_mode="r"``, so a corpus larger than memory
costs nothing until it is read) or raw ``.bin`` (nanoGPT's layout: uint16 or uint32, no header).
A sidecar ``<file>.json`` records ``vocab_size`` and ``eos_id``; both can also be given by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TokenStream:
    """tokens: (num_tokens,) integer ids; documents end with ``eos_id`` (None: one long document)."""

    tokens: np.ndarray
    vocab_size: int
    eos_id: int | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def split(self, val_fraction: float) -> tuple[TokenStream, TokenStream]:
        """(train, validation): the last ``val_fraction`` of the tokens is the validation split."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        cut = int(len(self) * (1.0 - val_fraction))
        return (
            TokenStream(self.tokens[:cut], self.vocab_size, self.eos_id),
            TokenStream(self.tokens[cut:], self.vocab_size, self.eos_id),
        )


def smallest_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_documents(encode, documents: Iterable[str], *, vocab_size: int, eos_id: int | None) -> TokenStream:
    """Tokenize every document with ``encode`` (str -> list[int]) and concatenate them, appending
    ``eos_id`` after each document when it is not None."""
    pieces: list[np.ndarray] = []
    dtype = smallest_dtype(vocab_size)
    for doc in documents:
        ids = encode(doc)
        if eos_id is not None:
            ids = [*ids, eos_id]
        pieces.append(np.asarray(ids, dtype=dtype))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return TokenStream(tokens, vocab_size, eos_id)


def write_tokens(path: str | os.PathLike, stream: TokenStream) -> Path:
    """Write ``stream`` to ``path`` (``.npy`` or ``.bin``) and its sidecar ``.json``, each through a
    temporary file and a rename, so that a reader never sees a partial file."""
    path = Path(path)
    if path.suffix not in (".npy", ".bin"):
        raise ValueError(f"token file must end in .npy or .bin, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.ascontiguousarray(stream.tokens, dtype=smallest_dtype(stream.vocab_size))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        if path.suffix == ".npy":
            np.save(f, tokens)
        else:
            tokens.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    meta = {"vocab_size": stream.vocab_size, "eos_id": stream.eos_id, "dtype": tokens.dtype.name}
    meta_path = path.with_name(path.name + ".json")
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)
    return path


def open_tokens(
    path: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    eos_id: int | None = None,
    dtype: str | None = None,
) -> TokenStream:
    """Memory-map a token file. Arguments given here override the sidecar ``.json``; ``vocab_size``
    is required (from one or the other), ``dtype`` is required for a ``.bin`` without a sidecar."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    meta_path = path.with_name(path.name + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    vocab_size = vocab_size if vocab_size is not None else meta.get("vocab_size")
    eos_id = eos_id if eos_id is not None else meta.get("eos_id")
    if vocab_size is None:
        raise ValueError(
            f"vocab_size of {path} is unknown: give data.vocab_size or write a sidecar {meta_path.name}"
        )
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
        dtype = dtype or meta.get("dtype")
        if dtype is None:
            raise ValueError(
                f"dtype of the raw token file {path} is unknown: give data.token_dtype (uint16, uint32)"
            )
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    else:
        raise ValueError(f"token file must end in .npy or .bin, got {path.name!r}")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"{path} must hold a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}"
        )
    return TokenStream(tokens, int(vocab_size), None if eos_id is None else int(eos_id))
