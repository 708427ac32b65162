"""Streaming I/O of Hugging Face checkpoint files: lazy readers for safetensors and ``pytorch_model*.bin``, and a
safetensors writer that emits one tensor at a time.

A HF checkpoint directory holds its weights in one of four layouts (the order below is the order of preference,
as in ``transformers``):

  * ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors`` shards,
  * a single ``model.safetensors``,
  * ``pytorch_model.bin.index.json`` + ``pytorch_model-0000k-of-0000n.bin`` shards,
  * a single ``pytorch_model.bin``.

`HFCheckpoint.open` finds the layout, validates the index against the shards and every shard's header against its
size, and lists each tensor's file, shape and dtype without reading any tensor data. `HFCheckpoint.read` then reads
one tensor at a time. Safetensors data is read with positioned reads into a fresh buffer rather than through a
memory map: pages of a map stay counted in the process's resident memory until the whole file is unmapped, so a
5 GB shard read through a map would show up as 5 GB of RSS. ``.bin`` files are opened with
``torch.load(mmap=True, weights_only=True)``; after a tensor has been copied out, its pages are released with
``madvise(MADV_DONTNEED)`` for the same reason. Legacy (pre-zip) ``.bin`` files cannot be mapped: each is loaded
whole while its tensors are read and dropped when reading moves on to another, so at most one is held.

Every problem is reported as `HFCheckpointError` with one line naming the file, the key, what was expected and
what was found, and what to do.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from deepseekmoe_jax.fs import read_json

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Safetensors dtype codes -> numpy dtypes this project reads (all floating point).
READABLE_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# Item sizes of every safetensors dtype code, so that headers of tensors we cannot read can still be validated.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
_NUMPY_TO_SAFETENSORS = {v: k for k, v in READABLE_SAFETENSORS_DTYPES.items()}
# torch dtype names ("bfloat16", ...; numpy's names for the same types) -> safetensors codes.
_TORCH_READABLE = {dt.name: code for code, dt in READABLE_SAFETENSORS_DTYPES.items()}
# Largest safetensors shard written by default: "5GB", the size HF's save_pretrained uses.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class HFCheckpointError(ValueError):
    """A HF checkpoint directory or file cannot be read as it is; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a HF checkpoint lives and what it is, known without reading its data.

    ``dtype`` is the safetensors dtype code (``"BF16"``, ``"F32"``, ...; torch dtypes are mapped to the same codes,
    unknown ones keep their torch name); `readable` says whether this project can convert it.
    """

    key: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    offset: int = 0  # absolute byte offset in the file (safetensors only)

    @property
    def readable(self) -> bool:
        return self.dtype in READABLE_SAFETENSORS_DTYPES

    @property
    def numpy_dtype(self) -> np.dtype:
        return READABLE_SAFETENSORS_DTYPES[self.dtype]


def numpy_dtype(name: str) -> np.dtype:
    """``"bfloat16"`` / ``"float32"`` / ``"float16"`` -> numpy dtype (bfloat16 from ml_dtypes)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_label(dtype: Any) -> str:
    """A numpy/ml_dtypes/jax dtype -> ``"bfloat16"``, ``"float32"``, ..."""
    return np.dtype(dtype).name


# ----------------------------------------------------------------------------------------------- safetensors
class SafetensorsFile:
    """A safetensors file whose header has been read and validated; tensors are read one by one on demand.

    Validation covers what a truncated download or a damaged file shows: a header length beyond the file, a
    header that is not JSON, entries whose byte range does not match shape x dtype, ranges that overlap or leave
    holes, data that ends before (truncated) or after (trailing bytes) the end of the file.
    """

    def __init__(self, path: str, display_name: str | None = None):
        self.path = path
        self.name = display_name or os.path.basename(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] | None = None
        self._file: BinaryIO | None = None
        self._parse()

    def _fail(self, msg: str) -> HFCheckpointError:
        return HFCheckpointError(f"{self.path}: {msg}")

    def _parse(self) -> None:
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail(
                        f"only {size} bytes, too short for a safetensors header; the file is truncated: re-download it"
                    )
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER_BYTES or 8 + n > size:
                    raise self._fail(
                        f"header length field says {n} bytes but the file has {size} bytes; the file is truncated "
                        "or not a safetensors file: re-download it"
                    )
                raw = f.read(n)
        except OSError as e:
            raise self._fail(f"cannot read ({e.strerror or e})") from None

        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            dup = next((k for k in keys if keys.count(k) > 1), None) if len(set(keys)) < len(keys) else None
            if dup is not None:
                raise self._fail(f"header lists tensor {dup!r} twice; the file is corrupt: re-download it")
            return dict(pairs)

        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not valid JSON ({e}); the file is corrupt: re-download it") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object; the file is corrupt: re-download it")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise self._fail("header field __metadata__ is not an object; the file is corrupt: re-download it")
        self.metadata = meta
        data_start = 8 + n
        spans = []
        for key, entry in header.items():
            info = self._entry(key, entry, data_start)
            self.tensors[key] = info
            spans.append((info.offset - data_start, info.offset - data_start + info.nbytes, key))
        spans.sort()
        cursor = 0
        for begin, end, key in spans:
            if begin != cursor:
                what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
                raise self._fail(
                    f"header offsets of {key!r} start at {begin} but the previous tensor ends at {cursor}: the range "
                    f"{what}; the header is corrupt: re-download the file"
                )
            cursor = end
        expected_size = data_start + cursor
        if expected_size > size:
            raise self._fail(
                f"the header says tensor data ends at byte {expected_size} but the file has only {size} bytes: the "
                "file is truncated (e.g. an interrupted download): re-download it"
            )
        if expected_size < size:
            raise self._fail(
                f"the header says tensor data ends at byte {expected_size} but the file has {size} bytes: "
                f"{size - expected_size} trailing bytes no tensor accounts for; the file is corrupt: re-download it"
            )

    def _entry(self, key: str, entry: Any, data_start: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise self._fail(f"header entry {key!r} lacks dtype/shape/data_offsets; the file is corrupt")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise self._fail(
                f"header entry {key!r} has an invalid dtype {dtype!r}; the file is corrupt: re-download it"
            )
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._fail(f"header entry {key!r} has an invalid shape {shape!r}; the file is corrupt")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(f"header entry {key!r} has invalid data_offsets {offsets!r}; the file is corrupt")
        nbytes = offsets[1] - offsets[0]
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None:
            want = math.prod(shape) * itemsize
            if nbytes != want:
                raise self._fail(
                    f"header entry {key!r} ({dtype}, shape {tuple(shape)}) needs {want} bytes but its data_offsets "
                    f"{offsets} span {nbytes}: the header is corrupt: re-download the file"
                )
        return TensorInfo(key, self.name, tuple(shape), str(dtype), nbytes, data_start + offsets[0])

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor ``key`` (or its rows ``start:stop`` along the first dimension) as a new numpy array, read
        with one positioned read; the file is not mapped."""
        info = self.tensors[key]
        if not info.readable:
            raise unreadable_dtype_error(info, self.path)
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (kept open across reads, closed by close())
        shape, offset, nbytes = info.shape, info.offset, info.nbytes
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * info.numpy_dtype.itemsize
            shape = (rows[1] - rows[0], *shape[1:])
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        buf = np.empty(nbytes, np.uint8)
        self._file.seek(offset)
        got = self._file.readinto(memoryview(buf))
        if got != nbytes:
            raise self._fail(f"{key!r}: expected {nbytes} bytes, read {got}; the file changed or is truncated")
        return buf.view(info.numpy_dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def unreadable_dtype_error(info: TensorInfo, path: str) -> HFCheckpointError:
    return HFCheckpointError(
        f"{path}: tensor {info.key!r} has dtype {info.dtype}; this tool converts floating-point weights only "
        f"({', '.join(READABLE_SAFETENSORS_DTYPES)}). Quantized checkpoints (int8, float8, ...) must be "
        "dequantized to bfloat16/float32 first"
    )


# ----------------------------------------------------------------------------------------------- torch .bin
def torch_to_numpy(t) -> np.ndarray:
    """A CPU numpy view of torch tensor ``t`` (shape and values unchanged; bfloat16 becomes ml_dtypes' bfloat16,
    reinterpreting the same bits, since numpy has no bfloat16 of its own). Shares memory with ``t`` when it is
    already on the CPU."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _libc_madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return fn
    except (OSError, AttributeError):
        return None


_MADVISE = _libc_madvise()
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


class TorchBinFile:
    """A ``pytorch_model*.bin`` file opened lazily with ``torch.load(mmap=True, weights_only=True)``.

    A legacy (pre-zip) ``torch.save`` file cannot be mapped and is read whole; ``mapped`` is then False. Such a
    file's tensors are dropped again once it has been indexed (`unload`) and read back whole on the first `read`,
    so that a checkpoint of many legacy shards holds at most the shard being read (see `HFCheckpoint.read`).
    """

    def __init__(self, path: str, display_name: str | None = None):
        self.path = path
        self.name = display_name or os.path.basename(path)
        self.mapped = True
        try:
            import torch
        except ImportError:
            raise HFCheckpointError(
                f"{path}: reading pytorch_model*.bin needs PyTorch (pip install torch; the CPU build is enough)"
            ) from None
        self._torch = torch
        state = self._load()
        self.tensors: dict[str, TensorInfo] = {}
        for key, t in state.items():
            name = str(t.dtype).removeprefix("torch.")
            code = _TORCH_READABLE.get(name, name)
            self.tensors[key] = TensorInfo(key, self.name, tuple(t.shape), code, t.numel() * t.element_size())
        self._state: dict | None = state
        if not self.mapped:
            self.unload()

    @property
    def loaded(self) -> bool:
        """Whether the file's tensors are held (always, for a mapped file: its pages are loaded on demand)."""
        return self._state is not None

    def _load(self) -> dict:
        """The file's state dict (mapped where the format allows); every value checked to be a tensor."""
        torch, path = self._torch, self.path
        state = None
        if self.mapped:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise self._corrupt(e) from None
                self.mapped = False
            except Exception as e:  # noqa: BLE001 (any failure of the unpickler means the file is unusable)
                raise self._corrupt(e) from None
        if state is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise self._corrupt(e) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise HFCheckpointError(
                f"{path}: holds a {type(state).__name__}, not a state dict of tensors; save the model's state_dict()"
            )
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise HFCheckpointError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
        return state

    def unload(self) -> None:
        """Drop the tensors of an unmapped (legacy) file; the next `read` loads them again. No-op when mapped."""
        if not self.mapped:
            self._state = None

    def _corrupt(self, e: BaseException) -> HFCheckpointError:
        text = str(e).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        return HFCheckpointError(
            f"{self.path}: cannot read this PyTorch checkpoint ({type(e).__name__}: {first[:200]}); the file is "
            "truncated or corrupt: re-download it"
        )

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor ``key`` (or rows ``start:stop`` of it) copied into a new numpy array; the mapped pages of
        the whole tensor are released once its last row has been read."""
        info = self.tensors[key]
        if not info.readable:
            raise unreadable_dtype_error(info, self.path)
        if self._state is None:
            self._state = self._load()
        full = self._state.get(key)
        if full is None or tuple(full.shape) != info.shape:
            raise HFCheckpointError(
                f"{self.path}: tensor {key!r} is no longer as first read ({info.shape}); the file changed during "
                "the conversion: rerun it on a stable copy"
            )
        t = full if rows is None else full[rows[0] : rows[1]]
        try:
            arr = np.array(torch_to_numpy(t.contiguous()))
        except RuntimeError as e:  # data beyond a truncated archive surfaces here
            raise self._corrupt(e) from None
        if self.mapped and (rows is None or rows[1] == info.shape[0]):
            self._release(full)
        return arr

    @staticmethod
    def _release(t) -> None:
        """Drop the pages of ``t``'s storage from this process (they are clean pages of a private file map, so a
        later access would read them from the file again)."""
        if _MADVISE is None:
            return
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        page = mmap.PAGESIZE
        lo = -(-start // page) * page
        hi = ((start + size) // page) * page
        if hi > lo:
            _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)

    def close(self) -> None:
        self._state = None


# ----------------------------------------------------------------------------------------------- directory
@dataclasses.dataclass
class HFCheckpoint:
    """The weights of a HF checkpoint directory, indexed but not loaded.

    Attributes:
      directory: the checkpoint directory.
      layout: ``"safetensors"`` or ``"bin"``.
      index_file: the index JSON (sharded layouts) or None.
      files: weight file names in checkpoint order.
      tensors: key -> `TensorInfo`, in file order and, within a file, data order.
    """

    directory: str
    layout: str
    index_file: str | None
    files: list[str]
    tensors: dict[str, TensorInfo]
    _readers: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> HFCheckpoint:
        """Find the weight files of ``directory``, validate index and headers, and list every tensor."""
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            raise HFCheckpointError(f"{directory}: no such directory")

        def has(name):
            return os.path.isfile(os.path.join(directory, name))

        if has(SAFE_INDEX):
            layout, index_file, files, weight_map = "safetensors", SAFE_INDEX, *_read_index(directory, SAFE_INDEX)
        elif has(SAFE_SINGLE):
            layout, index_file, files, weight_map = "safetensors", None, [SAFE_SINGLE], None
        elif has(BIN_INDEX):
            layout, index_file, files, weight_map = "bin", BIN_INDEX, *_read_index(directory, BIN_INDEX)
        elif has(BIN_SINGLE):
            layout, index_file, files, weight_map = "bin", None, [BIN_SINGLE], None
        else:
            shards = sorted(f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin")))
            hint = (
                f" (found {shards[:3]} but no index file {SAFE_INDEX} / {BIN_INDEX}: the download is incomplete)"
                if shards
                else ""
            )
            raise HFCheckpointError(
                f"{directory}: no weights found; expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or "
                f"{BIN_SINGLE}{hint}"
            )
        ckpt = cls(directory, layout, index_file, files, {})
        reader_cls = SafetensorsFile if layout == "safetensors" else TorchBinFile
        for name in files:
            reader = reader_cls(os.path.join(directory, name), name)
            ckpt._readers[name] = reader
            for key, info in sorted(reader.tensors.items(), key=lambda kv: kv[1].offset):
                if key in ckpt.tensors:
                    raise HFCheckpointError(
                        f"{os.path.join(directory, name)}: tensor {key!r} is also stored in "
                        f"{ckpt.tensors[key].file}; a key must live in exactly one shard"
                    )
                if weight_map is not None and weight_map.get(key) != name:
                    listed = weight_map.get(key)
                    where = f"maps it to {listed}" if listed else "does not list it"
                    raise HFCheckpointError(
                        f"{os.path.join(directory, name)}: holds tensor {key!r} but {index_file} {where}; index and "
                        "shards come from different downloads: re-download the checkpoint"
                    )
                ckpt.tensors[key] = info
            if layout == "bin" and not reader.tensors:
                raise HFCheckpointError(f"{os.path.join(directory, name)}: holds no tensors")
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if k not in ckpt.tensors]
            if absent:
                raise HFCheckpointError(
                    f"{os.path.join(directory, index_file)}: lists {len(absent)} tensor(s) that its shard does not "
                    f"hold, e.g. {absent[0]!r} in {weight_map[absent[0]]}; the shard is incomplete: re-download it"
                )
        return ckpt

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def path(self, key: str) -> str:
        return os.path.join(self.directory, self.tensors[key].file)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``key`` as a numpy array in its stored dtype (bfloat16 as ``ml_dtypes.bfloat16``); with
        ``rows=(start, stop)`` only that range of its first dimension."""
        reader = self._readers[self.tensors[key].file]
        if isinstance(reader, TorchBinFile) and not reader.mapped and not reader.loaded:
            # An unmapped .bin shard is held whole while read: drop any other so that at most one is in memory.
            for other in self._readers.values():
                if other is not reader and isinstance(other, TorchBinFile):
                    other.unload()
        return reader.read(key, rows)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_index(directory: str, name: str) -> tuple[list[str], dict[str, str]]:
    path = os.path.join(directory, name)
    index = read_json(path, HFCheckpointError, damaged="re-download it")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFCheckpointError(f"{path}: no 'weight_map' object (key -> shard file); re-download it")
    files: list[str] = []
    for key, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise HFCheckpointError(f"{path}: key {key!r} maps to {file!r}, which is not a file name in {directory}")
        if file not in files:
            files.append(file)
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        n = sum(1 for f in weight_map.values() if f == missing[0])
        raise HFCheckpointError(
            f"{path}: maps {n} tensor(s) to {missing[0]}, which does not exist in {directory} "
            f"({len(missing)} shard(s) missing); the download is incomplete: fetch the missing shards"
        )
    return sorted(files), weight_map


# ----------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors (in order) into consecutive shards of at most ``max_shard_bytes`` each (a larger tensor gets a
    shard of its own), as ``save_pretrained(max_shard_size=...)`` does."""
    shards: list[list[PlannedTensor]] = []
    current: list[PlannedTensor] = []
    size = 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    """HF shard names: ``model.safetensors`` for one shard, else ``model-0000k-of-0000n.safetensors``."""
    if n == 1:
        return [SAFE_SINGLE]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (all shapes and dtypes are known up front) first,
    then each tensor's bytes as it is produced, so only one tensor is ever held.

    Use as a context manager; `write` is called in plan order with each whole tensor, or with consecutive blocks
    of its rows (first dimension), so a large tensor need not be held at once either.
    """

    def __init__(self, path: str, tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self._plan = list(tensors)
        self._next = 0
        self._rows_done = 0
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in self._plan:
            code = _NUMPY_TO_SAFETENSORS.get(np.dtype(t.dtype))
            if code is None:
                raise HFCheckpointError(f"{path}: cannot store dtype {t.dtype} of {t.key!r} in safetensors")
            header[t.key] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, key: str, value: np.ndarray) -> None:
        t = self._plan[self._next]
        shape = tuple(value.shape)
        rows = shape[0] if t.shape else 1
        if (
            key != t.key
            or np.dtype(value.dtype) != t.dtype
            or (shape != t.shape and (not t.shape or shape[1:] != t.shape[1:]))
            or self._rows_done + rows > (t.shape[0] if t.shape else 1)
        ):
            raise AssertionError(
                f"{self.path}: tensor {self._next} must be {t.key} {t.shape} {t.dtype} (rows from "
                f"{self._rows_done}), got {key} {shape} {value.dtype}"
            )
        arr = contiguous(value)
        self._file.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._rows_done += rows
        if self._rows_done == (t.shape[0] if t.shape else 1):
            self._next += 1
            self._rows_done = 0

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._plan):
            raise AssertionError(f"{self.path}: wrote {self._next} of {len(self._plan)} tensors")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def contiguous(x: np.ndarray, block: int = 128) -> np.ndarray:
    """A C-contiguous copy of ``x`` (``x`` itself if it already is one).

    Transposed 2-D views are copied block by block: numpy's element-wise strided copy of a transposed matrix
    misses the cache on every element and runs several times slower than reading the data from disk.
    """
    if x.flags.c_contiguous:
        return x
    if x.ndim != 2:
        return np.ascontiguousarray(x)
    out = np.empty(x.shape, x.dtype)
    rows, cols = x.shape
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            out[i : i + block, j : j + block] = x[i : i + block, j : j + block]
    return out


def write_index(directory: str, shards: Sequence[Sequence[PlannedTensor]], names: Sequence[str]) -> None:
    """``model.safetensors.index.json`` for a sharded save (``metadata.total_size`` + ``weight_map``)."""
    weight_map = {t.key: name for shard, name in zip(shards, names, strict=True) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    with open(os.path.join(directory, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"200MiB"`` -> 209715200, ``"1000"`` -> 1000 (HF's decimal/binary units)."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    number, mult = s, 1
    for suffix, factor in units.items():
        if s.endswith(suffix):
            number, mult = s[: -len(suffix)], factor
            break
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if not math.isfinite(value) or not math.isfinite(value * mult):
        raise ValueError(f"size {text!r} is not a finite number of bytes; use e.g. 5GB, 500MB or 2GiB")
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    size = int(value * mult)
    if size < 1:
        raise ValueError(f"size {text!r} is less than one byte; use e.g. 5GB, 500MB or 2GiB")
    return size


def iter_file_order(ckpt: HFCheckpoint, keys: Iterable[str]) -> Iterator[str]:
    """``keys`` sorted by (file, offset) so that shards are read front to back."""
    order = {f: i for i, f in enumerate(ckpt.files)}
    yield from sorted(keys, key=lambda k: (order[ckpt.tensors[k].file], ckpt.tensors[k].offset))
