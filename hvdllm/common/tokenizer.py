"""Tokenizers: UTF-8 bytes, or a Hugging Face ``tokenizers`` BPE.

``data.tokenizer`` names one:

* ``"bytes"`` (the default): each UTF-8 byte is a token, vocabulary 256;
* a ``tokenizer.json`` file, or a directory holding one (a Hugging Face
  model directory, or the output of ``hvdllm tokenizer train``).

:func:`train_bpe` trains a byte-level BPE with Hugging Face ``tokenizers``
(``hvdllm tokenizer train``).  Every tokenizer here has ``encode(text) ->
np.ndarray``, ``decode(tokens) -> str``, ``vocab_size``, ``eos_id`` (or
``None``) and ``fingerprint`` (what a prepared corpus records, to catch a
different tokenizer at training time).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import ConfigError, DataError

BYTE_VOCAB_SIZE = 256
TOKENIZER_FILE = "tokenizer.json"
# The special token a trained BPE ends each document with.
END_OF_TEXT = "<|endoftext|>"
# Hugging Face's usual names for the end-of-text token, in order of preference.
EOS_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary of 256, no unknown tokens."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = None
    kind = "bytes"
    fingerprint = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, tokens) -> str:
        arr = np.asarray(tokens, dtype=np.int64)
        return bytes(int(t) for t in arr if 0 <= t < 256).decode("utf-8", errors="replace")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ConfigError(f"Hugging Face tokenizers is not importable ({exc}); run `make setup` "
                          f"or `pip install tokenizers`") from None
    return tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json``."""

    kind = "hf"

    def __init__(self, path: str | Path):
        tokenizers = _import_tokenizers()
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ConfigError(f"data.tokenizer {self.path} is not a tokenizer.json "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                              ) from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.eos_id = next((vocab[name] for name in EOS_NAMES if name in vocab), None)
        self.fingerprint = "sha256:" + hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encoded]

    def decode(self, tokens) -> str:
        ids = [int(t) for t in np.asarray(tokens, dtype=np.int64).ravel()
               if 0 <= t < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=False)


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_file(spec: str) -> Path | None:
    """The ``tokenizer.json`` that ``spec`` names; ``None`` for ``"bytes"``."""
    if spec in ("", "bytes"):
        return None
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise ConfigError(f"data.tokenizer {spec!r} is neither \"bytes\" nor a tokenizer.json "
                          f"file or a directory holding one")
    return p


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer ``spec`` (``data.tokenizer``) names."""
    path = tokenizer_file(spec)
    return ByteTokenizer() if path is None else HFTokenizer(path)


def check_vocab(tokenizer: Tokenizer, vocab_size: int, what: str = "data.tokenizer") -> None:
    """One-line error when the model's vocabulary cannot hold the tokenizer's ids."""
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size = {vocab_size} is smaller than {what}'s vocabulary "
                          f"of {tokenizer.vocab_size}; set model.vocab_size >= "
                          f"{tokenizer.vocab_size}")


def corpus_files(paths: Iterable[str]) -> list[Path]:
    """Text files of ``paths`` (files, or directories read recursively in sorted order,
    hidden entries skipped), with a one-line error for a missing path or no files."""
    files: list[Path] = []
    for spec in paths:
        p = Path(os.path.expanduser(spec))
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not any(
                part.startswith(".") for part in q.relative_to(p).parts))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"corpus path not found: {spec}")
    if not files:
        raise DataError(f"no corpus files in {', '.join(map(str, paths)) or '(nothing given)'}")
    return files


def read_text_chunks(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[str]:
    """``path`` as text in pieces of about ``chunk_bytes``, cut after a newline where
    possible (so no word is split) and never inside a UTF-8 character."""
    with open(path, "rb") as f:
        carry = b""
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            data = carry + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no newline: cut at a character boundary
                cut = len(data)
                while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
                    cut -= 1
                if cut > 0 and data[cut - 1] >= 0xC0:
                    cut -= 1
                if cut == 0:
                    cut = len(data)
            carry = data[cut:]
            yield data[:cut].decode("utf-8", errors="replace")
        if carry:
            yield carry.decode("utf-8", errors="replace")


def train_bpe(corpus: Sequence[str], vocab_size: int, out_dir: str | Path,
              min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on ``corpus`` and write ``out_dir/tokenizer.json``.

    Byte-level pre-tokenization (as GPT-2's), so any text encodes without
    unknown tokens; ``<|endoftext|>`` is a special token that ends documents.
    """
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_VOCAB_SIZE + 1:
        raise ConfigError(f"--vocab-size must be at least {BYTE_VOCAB_SIZE + 1} (the 256 byte "
                          f"symbols and {END_OF_TEXT}), got {vocab_size}")
    files = corpus_files(corpus)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts() -> Iterator[str]:
        for path in files:
            yield from read_text_chunks(path)

    tok.train_from_iterator(texts(), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tok.save(str(path))
    (out / "hvdllm_tokenizer.json").write_text(json.dumps({
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "corpus": [str(p) for p in files], "min_frequency": min_frequency}, indent=1) + "\n")
    return path
