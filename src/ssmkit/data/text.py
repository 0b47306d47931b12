"""Tokenizers for training on text: character-level, a byte-level BPE trained locally with the
``tokenizers`` library, or the ``tokenizer.json`` of a checkpoint folder.

Every tokenizer has the same small interface (:class:`Tokenizer`): ``encode``, ``decode``,
``vocab_size``, ``eos_id`` and ``save(folder)``; :func:`load_tokenizer` reads back whatever
``save`` wrote, so a training run stores its tokenizer beside its checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, folder: str | os.PathLike) -> None: ...


class CharTokenizer:
    """One token per distinct character of the training text (sorted, so the ids do not depend on
    the order the characters first appear). With ``add_eos`` an extra id ends each document."""

    def __init__(self, chars: list[str], *, add_eos: bool = False) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars must be distinct")
        self.chars = list(chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.eos_id = len(self.chars) if add_eos else None
        self.vocab_size = len(self.chars) + (1 if add_eos else 0)

    @classmethod
    def train(cls, text: str, *, add_eos: bool = False) -> CharTokenizer:
        return cls(sorted(set(text)), add_eos=add_eos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != self.eos_id)

    def save(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / CHAR_TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"chars": self.chars, "add_eos": self.eos_id is not None}))


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (BPE or any other model) behind the :class:`Tokenizer` interface."""

    def __init__(self, tokenizer, *, eos_token: str | None = EOS_TOKEN) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token else None

    @classmethod
    def train_bpe(cls, texts: list[str], *, vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
        """Byte-level BPE (GPT-2 style: any text encodes, no unknown token) learnt from ``texts``."""
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = RawTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        from tokenizers import Tokenizer as RawTokenizer

        raw = RawTokenizer.from_file(str(path))
        # A checkpoint folder names its end-of-text token in its config; without one, look for the
        # usual spellings so that document boundaries still get a separator.
        eos = _eos_token_from_folder(Path(path).parent)
        if eos is None:
            eos = next((t for t in (EOS_TOKEN, "</s>", "<eos>") if raw.token_to_id(t) is not None), None)
        return cls(raw, eos_token=eos)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(Path(folder) / HF_TOKENIZER_FILE))


def _eos_token_from_folder(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def load_tokenizer(folder: str | os.PathLike) -> CharTokenizer | HFTokenizer:
    """The tokenizer saved in ``folder`` (a training run's output or a Hugging Face checkpoint)."""
    folder = Path(folder)
    if (folder / CHAR_TOKENIZER_FILE).is_file():
        data = json.loads((folder / CHAR_TOKENIZER_FILE).read_text())
        return CharTokenizer(data["chars"], add_eos=data["add_eos"])
    if (folder / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer.from_file(folder / HF_TOKENIZER_FILE)
    raise FileNotFoundError(
        f"no tokenizer in {folder}: expected {CHAR_TOKENIZER_FILE} or {HF_TOKENIZER_FILE}"
    )


def split_documents(text: str, separator: str | None) -> list[str]:
    """The documents of a text file: the whole text when ``separator`` is None, else the non-empty
    pieces between separators (e.g. ``"\\n\\n"`` for blank-line separated paragraphs)."""
    if separator is None:
        return [text] if text else []
    if separator == "":
        raise ValueError("doc_separator must be None or a non-empty string, got ''")
    return [doc for doc in text.split(separator) if doc]


def build_tokenizer(
    spec: str, documents: list[str], *, vocab_size: int = 4096, add_eos: bool = False
) -> CharTokenizer | HFTokenizer:
    """``spec`` is ``"char"``, ``"bpe"`` (trained on ``documents`` to ``vocab_size`` tokens) or a
    folder holding a saved tokenizer (a checkpoint folder)."""
    if spec == "char":
        return CharTokenizer.train("".join(documents), add_eos=add_eos)
    if spec == "bpe":
        logger.info(
            "training a byte-level BPE tokenizer (%d tokens) on %d documents", vocab_size, len(documents)
        )
        return HFTokenizer.train_bpe(documents, vocab_size=vocab_size)
    if Path(spec).is_dir():
        return load_tokenizer(spec)
    raise ValueError(f"tokenizer must be 'char', 'bpe' or a folder holding a tokenizer, got {spec!r}")
