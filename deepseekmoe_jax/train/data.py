"""Token files, the ``prepare`` command, and a deterministic, resumable, per-process batch source.

Dataset directory (written by `prepare`, read by `TokenDataset`)::

    DIR/
      dataset.json      format, dtype, vocab size, eos/bos/pad ids, tokenizer description, per-split counts
      train.bin         the training split: one flat array of token ids (little-endian uint16 when the
                        vocabulary fits in 65536 ids, else uint32), documents packed back to back, each
                        followed by the eos id
      val.bin           the held-out split, same layout
      tokenizer.json    a copy of the HF tokenizer, when one was used

Training sequences are windows of ``seq_len + 1`` tokens starting at multiples of ``seq_len`` (inputs are the
first ``seq_len`` tokens, targets the last ``seq_len``); they cross document boundaries, which the eos tokens
mark. The order of windows is a keyed pseudo-random permutation per epoch (`permute`): sequence number ``n`` of
the run is window ``permute(n mod W, W, seed, n // W)``. The whole data state is therefore the count of
sequences consumed, which the checkpoint stores. A process reads only the rows its devices hold.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from deepseekmoe_jax.fs import (
    PublishError,
    fsync_tree,
    make_staging_dir,
    overlapping_input,
    publish_directory,
    read_json,
    remove_stale_staging,
)
from deepseekmoe_jax.tokenizer import HFTokenizer, Tokenizer

DATASET_FILE = "dataset.json"
FORMAT = "deepseekmoe-jax-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DataError(ValueError):
    """A dataset is missing, malformed, empty, too short or does not fit the model; the message says which."""


# ----------------------------------------------------------------------------------------------- order
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray | int, n: int, seed: int, epoch: int) -> np.ndarray:
    """A keyed bijection of ``[0, n)``: a 4-round Feistel network on the smallest even bit width covering ``n``,
    with cycle-walking for values that land outside. O(1) memory whatever ``n`` is; the same on every machine.

    index: int or int array with values in ``[0, n)``; returns an int64 array of the same shape.
    """
    if n <= 0:
        raise ValueError("permute: n must be positive")
    x = np.asarray(index, np.uint64)
    if n == 1:
        return np.zeros(x.shape, np.int64)
    bits = max(2, math.ceil(math.log2(n)))
    bits += bits % 2
    half = bits // 2
    mask = np.uint64((1 << half) - 1)
    keys = _mix64(np.arange(4, dtype=np.uint64) + _mix64(np.uint64(seed) * np.uint64(1 << 20) + np.uint64(epoch)))

    def feistel(v):
        left, right = v >> np.uint64(half), v & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(x)
    outside = out >= np.uint64(n)
    while np.any(outside):  # cycle-walking: at most a few rounds as the domain is < 4n
        out = np.where(outside, feistel(out), out)
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class TokenSplit:
    """One split of a dataset: ``tokens`` is a read-only memory map [num_tokens]."""

    name: str
    path: str
    tokens: np.ndarray
    documents: int
    max_token_id: int

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def num_windows(self, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens at stride ``seq_len``."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def windows(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """Windows ``indices`` [...] -> int32 tokens [..., seq_len + 1]."""
        indices = np.asarray(indices, np.int64)
        out = np.empty((*indices.shape, seq_len + 1), np.int32)
        flat = out.reshape(-1, seq_len + 1)
        for j, w in enumerate(indices.reshape(-1)):
            flat[j] = self.tokens[w * seq_len : w * seq_len + seq_len + 1]
        return out


TOKEN_DTYPES = ("uint16", "uint32")


def _read_meta(meta_path: str) -> dict[str, Any]:
    """``dataset.json``, checked key by key: each problem is a `DataError` naming the file and the key."""
    meta = read_json(meta_path, DataError, damaged="the dataset is damaged: prepare it again")
    if not isinstance(meta, dict):
        raise DataError(
            f"{meta_path}: expected a JSON object, found a {type(meta).__name__}; the dataset is damaged: prepare it "
            "again"
        )
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )

    def bad(key: str, expected: str, value: Any = None, missing: bool = False):
        found = "is missing" if missing else f"is {value!r}"
        raise DataError(
            f"{meta_path}: key '{key}' {found}: expected {expected}; the dataset is damaged: prepare it again"
        )

    def get(obj: dict, key: str, where: str, check: Callable[[Any], bool], expected: str):
        if key not in obj:
            bad(where, expected, missing=True)
        if not check(obj[key]):
            bad(where, expected, obj[key])
        return obj[key]

    def count(lo: int) -> Callable[[Any], bool]:
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo

    get(meta, "dtype", "dtype", lambda v: v in TOKEN_DTYPES, f"one of {list(TOKEN_DTYPES)}")
    vocab = get(meta, "vocab_size", "vocab_size", count(1), "a positive integer")
    get(meta, "eos_id", "eos_id", lambda v: count(0)(v) and v < vocab, f"a token id below vocab_size={vocab}")
    get(meta, "tokenizer", "tokenizer", lambda v: isinstance(v, dict), "an object describing the tokenizer")
    splits = get(meta, "splits", "splits", lambda v: isinstance(v, dict), "an object of split name -> counts")
    for name, info in splits.items():
        where = f"splits.{name}"
        if not isinstance(info, dict):
            bad(where, "an object with file, tokens, documents and max_token_id", info)
        get(
            info,
            "file",
            f"{where}.file",
            lambda v: isinstance(v, str) and v not in ("", ".", "..") and os.path.basename(v) == v,
            "a file name inside the dataset directory",
        )
        get(info, "tokens", f"{where}.tokens", count(0), "an integer >= 0")
        get(info, "documents", f"{where}.documents", count(0), "an integer >= 0")
        get(info, "max_token_id", f"{where}.max_token_id", count(-1), "an integer >= -1")
    return meta


class TokenDataset:
    """A prepared dataset directory (see the module docstring). Splits are memory-mapped, never read whole."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.path.abspath(os.fspath(directory))
        meta_path = os.path.join(self.directory, DATASET_FILE)
        if not os.path.isfile(meta_path):
            raise DataError(
                f"{self.directory}: no {DATASET_FILE}; make a dataset with "
                "`python train.py prepare --input TEXT_FILES --output DIR --tokenizer bytes|tokenizer.json`"
            )
        meta = _read_meta(meta_path)
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.vocab_size = meta["vocab_size"]
        self.eos_id = meta["eos_id"]
        self.tokenizer = dict(meta["tokenizer"])
        self.splits: dict[str, TokenSplit] = {}
        for name, info in meta["splits"].items():
            path = os.path.join(self.directory, info["file"])
            n = info["tokens"]
            size = os.path.getsize(path) if os.path.isfile(path) else -1
            if size != n * self.dtype.itemsize:
                found = "no file" if size < 0 else f"{size} bytes"
                if size > 0 and size % self.dtype.itemsize:
                    found += f", not a whole number of {self.dtype.itemsize}-byte {self.dtype.name} tokens"
                raise DataError(
                    f"{path}: expected {n} {self.dtype.name} tokens ({n * self.dtype.itemsize} bytes) as "
                    f"{DATASET_FILE} says, found {found}; the dataset is incomplete: prepare it again"
                )
            try:
                tokens = np.memmap(path, self.dtype, mode="r", shape=(n,)) if n else np.zeros((0,), self.dtype)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
            self.splits[name] = TokenSplit(name, path, tokens, info["documents"], info["max_token_id"])

    def split(self, name: str) -> TokenSplit:
        if name not in self.splits:
            raise DataError(f"{self.directory}: no '{name}' split (has {sorted(self.splits)})")
        return self.splits[name]

    def check_model(self, vocab_size: int, eos_token_id) -> list[str]:
        """Raise `DataError` if token ids do not fit ``vocab_size``; return warnings (e.g. eos mismatch)."""
        for s in self.splits.values():
            if s.num_tokens and s.max_token_id >= vocab_size:
                raise DataError(
                    f"{s.path}: holds token id {s.max_token_id} but the model's vocab_size is {vocab_size}; "
                    "use a tokenizer whose ids fit the model or a model with a larger vocabulary"
                )
        warnings = []
        eos = eos_token_id[0] if isinstance(eos_token_id, list | tuple) else eos_token_id
        if eos is not None and eos != self.eos_id:
            warnings.append(
                f"{self.directory}: documents end with eos id {self.eos_id} but the model config says "
                f"eos_token_id={eos}; sampling will stop at the config's id"
            )
        return warnings


class BatchSource:
    """Sequence windows of one split in a deterministic order.

    ``shuffle=True``: sequence ``n`` is window ``permute(n mod W, W, seed, n // W)`` (a fresh order every epoch);
    ``shuffle=False``: window ``n mod W`` (evaluation). `rows` reads any range of sequence numbers, so each
    process reads only its own rows of a global batch. With ``vocab_size``, every row read is checked to hold only
    ids below it (``dataset.json``'s ``max_token_id`` is checked up front, but the token file itself may differ).
    """

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, shuffle: bool = True, vocab_size: int | None = None):
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.vocab_size = vocab_size
        # Ids of a file whose dtype cannot hold vocab_size - 1 or more (uint16 for a 100k vocabulary) always fit.
        self.checks_ids = vocab_size is not None and int(np.iinfo(split.tokens.dtype).max) >= vocab_size
        self.num_windows = split.num_windows(seq_len)
        if self.num_windows == 0:
            raise DataError(
                f"{split.path}: {split.num_tokens} tokens cannot fill one sequence of seq_len + 1 = "
                f"{seq_len + 1} tokens; add data or lower train.seq_len"
            )

    def window_indices(self, sequence_numbers: np.ndarray) -> np.ndarray:
        n = np.asarray(sequence_numbers, np.int64)
        w = self.num_windows
        if not self.shuffle:
            return n % w
        out = np.empty_like(n)
        epochs = n // w
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = permute(n[sel] % w, w, self.seed, int(e))
        return out

    def rows(self, first: int, count: int) -> np.ndarray:
        """Tokens of sequence numbers ``first .. first + count - 1``: int32 [count, seq_len + 1].

        Raises `DataError` naming the file, the window and the token position if an id is >= ``vocab_size``
        (ids of 2**31 or more in a uint32 file turn negative in int32 and are caught as such).
        """
        windows = self.window_indices(np.arange(first, first + count))
        out = self.split.windows(windows, self.seq_len)
        if self.checks_ids and out.size and (int(out.max()) >= self.vocab_size or int(out.min()) < 0):
            row, col = (int(i) for i in np.argwhere((out >= self.vocab_size) | (out < 0))[0])
            w = int(windows[row])
            position = w * self.seq_len + col
            stored = int(self.split.tokens[position])  # the id as in the file, before the int32 conversion
            raise DataError(
                f"{self.split.path}: token id {stored} at position {position:,} "
                f"(sequence {first + row}, window {w} = tokens {w * self.seq_len:,}..{(w + 1) * self.seq_len:,}) "
                f"is not below the model's vocab_size={self.vocab_size}, although {DATASET_FILE} gives "
                f"max_token_id={self.split.max_token_id}: the token file does not match its metadata; prepare the "
                "dataset again"
            )
        return out


def global_batch(source: BatchSource, position: int, shape: tuple[int, int], sharding) -> Any:
    """The batch of sequences ``position ..`` as a `jax.Array` int32 [A, B, seq_len + 1] with ``sharding``.

    Row ``(a, b)`` is sequence ``position + a * B + b``. Built with `jax.make_array_from_callback`, which asks
    this process only for the slices its own devices hold, so each process reads only its share of the data.
    """
    a_n, b_n = shape
    t1 = source.seq_len + 1
    cache: dict[tuple, np.ndarray] = {}

    def fetch(index):
        a_sl, b_sl = index[0], index[1]
        a0, a1, _ = a_sl.indices(a_n)
        b0, b1, _ = b_sl.indices(b_n)
        key = (a0, a1, b0, b1)
        if key not in cache:
            out = np.empty((a1 - a0, b1 - b0, t1), np.int32)
            for i, a in enumerate(range(a0, a1)):
                out[i] = source.rows(position + a * b_n + b0, b1 - b0)
            cache[key] = out
        return cache[key][(slice(None), slice(None), index[2])]

    return jax.make_array_from_callback((a_n, b_n, t1), sharding, fetch)


# ----------------------------------------------------------------------------------------------- prepare
@dataclass(frozen=True)
class Document:
    """One document: ``source`` (file path, with ``:line`` for JSONL lines), its ``file`` and a ``read`` callable."""

    source: str
    file: str
    read: Callable[[], bytes]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def list_files(inputs: Sequence[str], pattern: str = "*", recursive: bool = True) -> list[str]:
    """Files named by ``inputs`` (files as given; directories walked in sorted order, hidden entries skipped,
    basenames matching ``pattern``)."""
    files = []
    for item in inputs:
        if os.path.isfile(item):
            files.append(os.path.abspath(item))
        elif os.path.isdir(item):
            found = []
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not _is_hidden(d)) if recursive else []
                found += [
                    os.path.abspath(os.path.join(root, n))
                    for n in names
                    if not _is_hidden(n) and fnmatch.fnmatch(n, pattern)
                ]
            files += sorted(found)
        else:
            raise DataError(f"--input {item}: no such file or directory")
    return files


def _check_utf8(data: bytes, source: str, one_line: bool = False) -> bytes:
    """``data`` unchanged if it is UTF-8 text, else a `DataError` naming ``source``, the line (unless ``data`` is
    ``one_line`` of a file that ``source`` already names with its line number), the column and the byte."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        where = f"column {column}" if one_line else f"line {line}, column {column}"
        raise DataError(
            f"{source}: {where}: not UTF-8 text (byte 0x{data[e.start]:02x}); prepare reads "
            "UTF-8 text only: convert the file to UTF-8 or leave it out (--pattern selects the files of a directory)"
        ) from None
    return data


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return _check_utf8(f.read(), path)
    except OSError as e:
        raise DataError(f"--input {path}: cannot read ({e.strerror or e})") from None


def _jsonl_documents(path: str, text_key: str) -> Iterator[Document]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"--input {path}: cannot read ({e.strerror or e})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            _check_utf8(line, f"{path}:{lineno}", one_line=True)
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                text = None
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with a string field {text_key!r} "
                    "(choose the field with --text-key)"
                )
            yield Document(f"{path}:{lineno}", path, lambda t=text: t.encode("utf-8"))


def iter_documents(files: Iterable[str], text_key: str = "text") -> Iterator[Document]:
    """Plain files are one document each; ``.jsonl`` files give one document per line (field ``text_key``).

    Input must be UTF-8 text: a file (or JSONL line) that is not is a `DataError` naming it, the line and the
    offending byte, rather than being tokenized with replacement characters (which would silently train on
    mojibake) or, for the byte tokenizer, as bytes of another encoding."""
    for path in files:
        if path.endswith(".jsonl"):
            yield from _jsonl_documents(path, text_key)
        else:
            yield Document(path, path, lambda p=path: _read_file(p))


def _chunks(docs: Iterator[Document], size: int) -> Iterator[tuple[list[Document], int]]:
    """Groups of up to ``size`` documents, each with the number of input files it completes."""
    chunk: list[Document] = []
    last_file = None
    done = 0
    for d in docs:
        if last_file is not None and d.file != last_file:
            done += 1
        last_file = d.file
        chunk.append(d)
        if len(chunk) == size:
            yield chunk, done
            chunk, done = [], 0
    yield chunk, done + (1 if last_file is not None else 0)


def _unit_hash(source: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def prepare(
    inputs: Sequence[str],
    output: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    pattern: str = "*",
    text_key: str = "text",
    add_bos: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    batch_documents: int = 64,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize text files into a dataset directory (see the module docstring) and return its metadata.

    Each document becomes ``[bos] tokens eos``. A document goes to the held-out split when a hash of its source
    name (and ``seed``) falls below ``val_fraction`` (so the split does not depend on file order); with
    ``val_fraction > 0`` and no document selected, the one with the smallest hash is held out, as long as at least
    two documents exist. The directory is built under a temporary name and renamed when complete; an existing
    ``output`` is only replaced with ``overwrite=True``, and only if it is a dataset (or an empty directory).

    Every check comes before anything is written: an ``output`` that is, contains or lies inside one of
    ``inputs`` is refused (it would delete or rewrite what is read), as is one that cannot be created. Staging
    directories of ``output`` left behind by a killed ``prepare`` are removed, one ``log`` line each (default:
    stderr). On any failure, directories this call created are removed again.
    """
    from tqdm import tqdm

    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    output = os.path.abspath(os.fspath(output))
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: expected a number in [0, 1)")
    _check_output(output, inputs)
    files = list_files(inputs, pattern)
    if not files:
        raise DataError(f"no input files found in {list(inputs)} (pattern {pattern!r})")
    created = _missing_dirs(output)
    for stale in remove_stale_staging(output):
        say(f"removed {stale}: a staging directory of {os.path.basename(output)} left by an interrupted prepare")
    if os.path.lexists(output):
        _check_replaceable(output, overwrite)
    dtype = token_dtype(tokenizer.vocab_size)

    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])

    def held_out(source: str) -> bool:
        return _unit_hash(os.path.relpath(source, root), seed) < val_fraction

    # With plain files only, guarantee a non-empty held-out split (JSONL lines are streamed, not counted first).
    forced = None
    if val_fraction > 0 and len(files) >= 2 and not any(f.endswith(".jsonl") for f in files):
        if not any(held_out(f) for f in files):
            forced = min(files, key=lambda f: _unit_hash(os.path.relpath(f, root), seed))

    tmp = None
    try:
        try:
            os.makedirs(os.path.dirname(output), exist_ok=True)
            tmp = make_staging_dir(output)
        except OSError as e:
            raise DataError(f"--output {output}: cannot create it ({e.strerror or e})") from None
        stats = {name: {"file": f"{name}.bin", "tokens": 0, "documents": 0, "max_token_id": -1} for name in SPLITS}
        handles = {name: open(os.path.join(tmp, f"{name}.bin"), "wb") for name in SPLITS}
        try:
            bar = tqdm(total=len(files), desc="tokenizing", unit="file", disable=not progress, file=sys.stderr)
            for chunk, files_done in _chunks(iter_documents(files, text_key), batch_documents):
                encoded = tokenizer.encode_batch([d.read() for d in chunk])
                for j, ids in enumerate(encoded):
                    source = chunk[j].source
                    name = "val" if (source == forced or held_out(source)) else "train"
                    parts = [ids, [tokenizer.eos_id]]
                    if add_bos:
                        if tokenizer.bos_id is None:
                            raise DataError("--add-bos: this tokenizer has no bos token (name it with --bos-token)")
                        parts.insert(0, [tokenizer.bos_id])
                    seq = np.concatenate([np.asarray(p, np.int64) for p in parts])
                    if seq.size and (seq.min() < 0 or seq.max() >= tokenizer.vocab_size):
                        raise DataError(
                            f"{chunk[j].source}: the tokenizer produced id {int(seq.max())} outside its "
                            f"vocabulary of {tokenizer.vocab_size}"
                        )
                    handles[name].write(seq.astype(dtype).tobytes())
                    s = stats[name]
                    s["tokens"] += int(seq.size)
                    s["documents"] += 1
                    s["max_token_id"] = max(s["max_token_id"], int(seq.max()))
                bar.update(files_done)
            bar.close()
        finally:
            for h in handles.values():
                h.close()
        if stats["train"]["tokens"] == 0:
            raise DataError(f"no training tokens: every document of {list(inputs)} was held out or empty")
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id),
            "bos_id": None if tokenizer.bos_id is None else int(tokenizer.bos_id),
            "pad_id": None if tokenizer.pad_id is None else int(tokenizer.pad_id),
            "add_bos": bool(add_bos),
            "tokenizer": tokenizer.describe(),
            "splits": stats,
            "sources": {"inputs": [os.path.abspath(i) for i in inputs], "files": len(files), "pattern": pattern},
            "val_fraction": val_fraction,
            "seed": seed,
        }
        if isinstance(tokenizer, HFTokenizer):
            shutil.copyfile(tokenizer.path, os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, DATASET_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        fsync_tree(tmp)
        publish_directory(tmp, output)  # an existing dataset stays in place until the new one is complete
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if isinstance(e, PublishError):
            raise DataError(str(e)) from None
        if isinstance(e, OSError):
            raise DataError(f"--output {output}: cannot write it ({e.strerror or e})") from None
        raise
    return meta


def _missing_dirs(output: str) -> list[str]:
    """The ancestors of ``output`` that do not exist, outermost first; refuses an ``output`` whose nearest
    existing ancestor is not a writable directory."""
    missing = []
    d = os.path.dirname(output)
    while not os.path.exists(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not os.path.isdir(d):
        raise DataError(
            f"--output {output}: {d} is not a directory, so nothing can be created inside it; choose another --output"
        )
    if not os.access(d, os.W_OK | os.X_OK):
        raise DataError(f"--output {output}: cannot write in {d} (permission denied); choose another --output")
    return missing[::-1]


def _check_output(output: str, inputs: Sequence[str]) -> None:
    """Refuse an ``output`` that is, contains or lies inside one of ``inputs``."""
    src = overlapping_input(output, inputs)
    if src is None:
        return
    out_real, src_real = os.path.realpath(output), os.path.realpath(src)
    if out_real == src_real:
        how = "is"
    elif src_real.startswith(out_real.rstrip(os.sep) + os.sep):
        how = "contains"
    else:
        how = "lies inside"
    raise DataError(
        f"--output {output} {how} the input {src}: writing it would delete or change what prepare reads; "
        "choose an --output outside the inputs"
    )


def _check_replaceable(output: str, overwrite: bool) -> None:
    """An existing ``output`` may be replaced only with ``overwrite``, and only if it is a dataset directory (or
    an empty one): ``--overwrite`` with a mistyped path must not delete unrelated files."""
    if not overwrite:
        raise DataError(f"{output} already exists; choose another --output or pass --overwrite to replace it")
    if not os.path.isdir(output) or os.path.islink(output):
        raise DataError(f"{output} exists and is not a directory; --overwrite replaces only a dataset directory")
    if os.listdir(output) and not os.path.isfile(os.path.join(output, DATASET_FILE)):
        raise DataError(
            f"{output} is not a dataset (no {DATASET_FILE}) and not empty; --overwrite replaces only a dataset "
            "made by prepare: choose another --output or remove the directory yourself"
        )


def stdlib_sources() -> list[str]:
    """The ``*.py`` files at the top of the running Python's standard library (``sysconfig`` ``stdlib`` path)."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        os.path.join(root, n) for n in os.listdir(root) if n.endswith(".py") and os.path.isfile(os.path.join(root, n))
    )
    if not files:
        raise DataError(f"{root}: no Python source files found for the built-in corpus")
    return files
