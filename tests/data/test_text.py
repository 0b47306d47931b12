"""Tokenizers: character-level, locally trained BPE, save/load, document splitting."""

from __future__ import annotations

import json

import pytest

from ssmkit.data import (
    CharTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
    split_documents,
    text_stream,
)

TEXT = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved.\n"


def test_char_tokenizer_round_trip_and_save(tmp_path):
    tok = CharTokenizer.train(TEXT)
    assert tok.vocab_size == len(set(TEXT)) and tok.eos_id is None
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert all(0 <= i < tok.vocab_size for i in ids)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.encode(TEXT) == ids


def test_char_tokenizer_eos_and_unknown_character():
    tok = CharTokenizer.train("abc", add_eos=True)
    assert tok.eos_id == 3 and tok.vocab_size == 4
    assert tok.decode([0, 3, 1]) == "ab"
    with pytest.raises(ValueError, match="'z' is not in the tokenizer's vocabulary"):
        tok.encode("az")


def test_bpe_trained_locally_round_trips(tmp_path):
    docs = split_documents(TEXT * 20, "\n\n")
    tok = build_tokenizer("bpe", docs, vocab_size=300)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size <= 300 and tok.eos_id is not None
    ids = tok.encode("Speak, speak. You are all resolved.")
    assert len(ids) < len("Speak, speak. You are all resolved.")  # merges were learnt
    assert tok.decode(ids) == "Speak, speak. You are all resolved."
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("Speak, speak.") == tok.encode("Speak, speak.") and again.eos_id == tok.eos_id


def test_tokenizer_of_a_checkpoint_folder_uses_its_eos(tmp_path):
    tok = build_tokenizer("bpe", [TEXT] * 5, vocab_size=280)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    loaded = build_tokenizer(str(tmp_path), [])
    assert loaded.eos_id == tok.eos_id


def test_split_documents_and_errors(tmp_path):
    assert split_documents("a\n\nb\n\n", "\n\n") == ["a", "b"]
    assert split_documents("abc", None) == ["abc"]
    with pytest.raises(ValueError, match="doc_separator"):
        split_documents("abc", "")
    with pytest.raises(ValueError, match="tokenizer must be 'char', 'bpe' or a folder"):
        build_tokenizer("wordpiece", ["abc"])
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)


def test_text_stream_ends_documents_with_eos(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    stream, tok = text_stream(path, tokenizer="char", doc_separator="\n\n")
    assert stream.eos_id == tok.eos_id is not None
    assert int((stream.tokens == tok.eos_id).sum()) == 3
    assert tok.decode(stream.tokens.tolist()) == TEXT.replace("\n\n", "")
