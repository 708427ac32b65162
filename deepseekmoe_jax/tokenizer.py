"""Tokenizers for training data and sampling: a byte-level tokenizer and HF ``tokenizer.json`` files.

Byte-level ids (fits any vocabulary of at least 259 entries, e.g. ``configs/tiny.yaml``'s 512)::

    0 = <pad>, 1 = <bos>, 2 = <eos>, byte b -> b + 3      (ids 3..258; ids above 258 are never produced)

A tokenizer is described in ``dataset.json`` and in a run's ``deepseekmoe_jax.json`` by a small dict
(`Tokenizer.describe`) so that `load_tokenizer` can rebuild it for sampling.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Protocol

import numpy as np

BYTE_OFFSET = 3
BYTE_PAD_ID, BYTE_BOS_ID, BYTE_EOS_ID = 0, 1, 2
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET

# Tried in order when a tokenizer.json is given without --eos-token.
EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
BOS_CANDIDATES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[CLS]")


class TokenizerError(ValueError):
    """A tokenizer file or description cannot be used; the message says which and why."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by `BYTE_OFFSET`, with pad/bos/eos at 0/1/2."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    bos_id = BYTE_BOS_ID
    pad_id = BYTE_PAD_ID

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text (or raw bytes) -> int32 ids [n]."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Ids -> text; special ids (and ids outside the byte range) are skipped, bad UTF-8 is replaced."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        keep = ids[(ids >= BYTE_OFFSET) & (ids < BYTE_OFFSET + 256)]
        return (keep - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {
            "type": "bytes",
            "offset": BYTE_OFFSET,
            "pad_id": BYTE_PAD_ID,
            "bos_id": BYTE_BOS_ID,
            "eos_id": BYTE_EOS_ID,
            "vocab_size": BYTE_VOCAB_SIZE,
        }


# What to do when no eos/bos token is found and the caller gave no hint: train.py prepare's options.
PREPARE_HINT = "name it with --{what}-token"


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library (no special tokens added).

    The eos (and bos) token is ``eos_token`` when given, else the first of the usual names (`EOS_CANDIDATES`) in the
    vocabulary, else the id ``eos_id`` (e.g. a model config's ``eos_token_id``) when given. When none applies,
    `TokenizerError` says so and ends with ``hint`` (``{what}`` becomes ``eos``/``bos``; default `PREPARE_HINT`),
    so each command can tell its user what it offers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        eos_token: str | None = None,
        bos_token: str | None = None,
        *,
        eos_id: int | None = None,
        bos_id: int | None = None,
        hint: str | None = None,
    ):
        self._hint = PREPARE_HINT if hint is None else hint
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise TokenizerError(
                "reading a tokenizer.json needs the 'tokenizers' package: pip install tokenizers "
                "(or deepseekmoe-jax[tokenizers])"
            ) from None
        self.path = os.path.abspath(os.fspath(path))
        if os.path.isdir(self.path):
            self.path = os.path.join(self.path, "tokenizer.json")
        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{self.path}: cannot load as a tokenizer.json ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._find(eos_token, EOS_CANDIDATES, "eos", eos_id)
        self.eos_token = self._tok.id_to_token(self.eos_id)
        try:
            self.bos_id = self._find(bos_token, BOS_CANDIDATES, "bos", bos_id)
        except TokenizerError:
            if bos_token is not None:
                raise
            self.bos_id = None
        self.pad_id = None

    def _find(self, given: str | None, candidates, what: str, fallback_id: int | None = None) -> int:
        names = (given,) if given is not None else candidates
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        if given is not None:
            raise TokenizerError(f"{self.path}: the {what} token {given!r} is not in this tokenizer's vocabulary")
        if fallback_id is not None:
            if not 0 <= fallback_id < self.vocab_size:
                raise TokenizerError(
                    f"{self.path}: found none of the usual {what} tokens, and the {what} id {fallback_id} is outside "
                    f"this tokenizer's {self.vocab_size} ids; {self._hint.format(what=what)}"
                )
            return int(fallback_id)
        raise TokenizerError(
            f"{self.path}: found none of the usual {what} tokens {list(candidates)}; {self._hint.format(what=what)}"
        )

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts):
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def sha256(self) -> str:
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "huggingface",
            "file": "tokenizer.json",
            "sha256": self.sha256(),
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "vocab_size": self.vocab_size,
        }


def tokenizer_from_arg(
    arg: str, eos_token: str | None = None, bos_token: str | None = None, **fallbacks: Any
) -> Tokenizer:
    """``"bytes"`` or a path to a ``tokenizer.json`` (or a directory holding one); ``fallbacks`` (``eos_id``,
    ``bos_id``, ``hint``) go to `HFTokenizer`."""
    if arg == "bytes":
        return ByteTokenizer()
    if not os.path.exists(arg):
        raise TokenizerError(f"--tokenizer {arg}: no such file; give 'bytes' or the path of a tokenizer.json")
    return HFTokenizer(arg, eos_token=eos_token, bos_token=bos_token, **fallbacks)


def load_tokenizer(description: dict[str, Any], directory: str | os.PathLike, **fallbacks: Any) -> Tokenizer:
    """Rebuild a tokenizer from its `describe` dict; a HF tokenizer's file is looked up in ``directory``
    (``fallbacks`` as in `tokenizer_from_arg`)."""
    kind = description.get("type")
    if kind == "bytes":
        if description.get("offset", BYTE_OFFSET) != BYTE_OFFSET:
            raise TokenizerError(f"byte tokenizer with offset {description.get('offset')} is not supported")
        return ByteTokenizer()
    if kind == "huggingface":
        path = os.path.join(os.fspath(directory), description.get("file", "tokenizer.json"))
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: missing; the tokenizer.json this data was made with should be here")
        return HFTokenizer(path, eos_token=description.get("eos_token"), **fallbacks)
    raise TokenizerError(f"unknown tokenizer type {kind!r} in {description}")
