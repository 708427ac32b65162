"""The ``params/`` directory of a model directory: what its leaves are, and streaming access to them.

``params/`` is an Orbax PyTree checkpoint of the parameters, a nested dict shaped like
``nnx.to_pure_dict(nnx.state(model, nnx.Param))``. A leaf is named by its key path (`LeafPath`, e.g.
``("model", "segments", "1", "layers", "0", "mlp", "experts", "w_gate")``); `leaf_specs` gives every leaf's shape,
dtype and logical axes for a config without allocating anything.

Streaming access. A 16B model's stacked expert kernel alone is ``[27, 64, 2048, 1408]`` (10 GB in bfloat16), so
the converter never holds a whole leaf. `ParamsWriter` lets Orbax write the complete checkpoint skeleton (all
Orbax metadata) for a proxy tree of the same structure and dtypes made of tiny arrays, without OCDBT so that each
leaf is its own zarr array; it then re-creates every leaf's zarr array at full size with the codec Orbax chose and
fills it slice by slice (one chunk per layer, and per expert for expert kernels). Nothing in Orbax's metadata
depends on the shapes of numpy leaves, so the result is a plain Orbax PyTree checkpoint, restored by
``StandardCheckpointer().restore`` and by `deepseekmoe_jax.checkpoint.load_checkpoint`. That relies on how Orbax
lays out its files, which Orbax does not promise across releases, so the writer refuses an orbax-checkpoint release
it was not tested with (`check_orbax_version`). `ParamsReader` reads slices of the arrays of any ``params/``
directory, with OCDBT (the default of ``StandardCheckpointer`` / ``CheckpointManager``, i.e. training checkpoints)
or without (converted checkpoints).

`CheckpointError` is defined here, the lowest layer that raises it; `deepseekmoe_jax.checkpoint` (whole model
directories) builds on this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.sharding import key_path

PARAMS_DIR = "params"  # the parameters' directory inside a model directory or a training step directory


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent; the message names the path."""


class _MissingItemMetadata(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def quiet_missing_item_metadata():
    """Orbax warns that a ``params`` item saved by a CheckpointManager (a training step) has no checkpoint-level
    metadata file of its own; that is how such items are laid out, not a problem, so the warning is filtered."""
    flt = _MissingItemMetadata()
    logger = logging.getLogger("absl")
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


# ----------------------------------------------------------------------------------------------- leaves
LeafPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One parameter of the model: ``shape``, numpy ``dtype`` and logical axis names (``axes``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[str | None, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def leaf_name(path: tuple) -> str:
    """Orbax's name of a leaf (its array directory / OCDBT key): the dict keys joined with dots."""
    return ".".join(str(p) for p in path)


def leaf_path(path: tuple) -> LeafPath:
    """A parameter path with every component as a string (``("model", "segments", "1", ...)``)."""
    return tuple(str(p) for p in path)


def leaf_specs(config: DeepseekConfig, state: Any = None) -> dict[LeafPath, LeafSpec]:
    """Every parameter of ``DeepseekForCausalLM(config)`` (path -> `LeafSpec`), computed without allocating."""
    state = nnx.state(abstract_model(config), nnx.Param) if state is None else state
    out = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for keys, var in flat:
        value = var.get_value() if hasattr(var, "get_value") else var.value
        path = key_path(keys)
        axes = tuple(var.get_metadata().get("logical_axes") or (None,) * len(value.shape))
        out[path] = LeafSpec(tuple(value.shape), np.dtype(value.dtype), axes)
    return out


def _nested(flat: dict[LeafPath, Any], like: Any) -> Any:
    """Rebuild ``like`` (a nested pure dict with the model's key types) with values from ``flat``."""
    return jax.tree_util.tree_map_with_path(lambda keys, _: flat[key_path(keys)], like)


_CHUNK_TARGET_BYTES = 16 * 2**20


def _chunk_shape(spec: LeafSpec) -> tuple[int, ...]:
    """One chunk per layer (and per expert) so that every HF tensor fills whole chunks; other dimensions are cut
    until a chunk is at most 16 MiB (the embedding, the LM head, the dense MLP), so that no large chunk has to be
    held whole while it is compressed."""
    chunk = [1 if ax in ("layers", "expert") else d for ax, d in zip(spec.axes, spec.shape, strict=True)]
    while math.prod(chunk) * spec.dtype.itemsize > _CHUNK_TARGET_BYTES:
        i = max(range(len(chunk)), key=lambda k: chunk[k])
        if chunk[i] == 1:
            break
        chunk[i] = -(-chunk[i] // 2)
    return tuple(max(1, c) for c in chunk)


# ----------------------------------------------------------------------------------------------- Orbax releases
# The writer relies on what Orbax does without promising it: that a PyTree checkpoint saved with use_ocdbt=False and
# use_zarr3=False keeps each leaf as a zarr (v2) array in a directory named `leaf_name`, that its _METADATA does
# not depend on the shapes of the leaves, and that a proxy leaf's .zarray names the codec Orbax uses for the real
# one. The major.minor releases it was tested with (tests/test_param_store.py, tests/test_convert.py):
ORBAX_TESTED = ("0.11", "0.12")
ORBAX_OLDEST = "0.11.40"  # the oldest release pyproject.toml allows, and tested


class UnsupportedOrbaxError(CheckpointError):
    """The installed orbax-checkpoint is a release the streaming writer was not tested with."""


def orbax_version() -> str:
    """The installed orbax-checkpoint release (e.g. ``"0.12.8"``)."""
    return ocp.__version__


def _release(version: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(g or 0) for g in m.groups()) if m else None


def check_orbax_version(version: str | None = None) -> None:
    """Raise `UnsupportedOrbaxError` unless ``version`` (default: the installed orbax-checkpoint) is a release of
    one of the `ORBAX_TESTED` major.minor series, at least `ORBAX_OLDEST`."""
    version = orbax_version() if version is None else version
    release = _release(version)
    tested = {_release(v)[:2] for v in ORBAX_TESTED}
    if release is None or release[:2] not in tested or release < _release(ORBAX_OLDEST):
        major, minor = _release(ORBAX_TESTED[-1])[:2]
        raise UnsupportedOrbaxError(
            f"orbax-checkpoint {version} is installed, but the streaming checkpoint writer was tested with "
            f"orbax-checkpoint {ORBAX_OLDEST} to {ORBAX_TESTED[-1]}.x only: it lays out Orbax's files itself, and "
            "with an untested release it could write a checkpoint that Orbax cannot read. Install a tested "
            f"release: pip install 'orbax-checkpoint>={ORBAX_OLDEST},<{major}.{minor + 1}'"
        )


def _orbax_skeleton(params_dir: str, specs: dict[LeafPath, LeafSpec], like: Any) -> None:
    """Let Orbax write a complete checkpoint of a proxy tree shaped like ``like`` whose leaves are tiny arrays of
    the dtypes of ``specs``, one zarr array per leaf (the layout `ParamsWriter` fills in)."""
    check_orbax_version()
    proxy = _nested({p: np.zeros((1,) * len(s.shape), s.dtype) for p, s in specs.items()}, like)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
    try:
        ocp.Checkpointer(handler).save(params_dir, args=ocp.args.PyTreeSave(proxy))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{params_dir}: cannot create the checkpoint ({e})") from None


def _full_size_array(params_dir: str, path: LeafPath, spec: LeafSpec, chunks: tuple[int, ...], context):
    """Re-create the proxy zarr array of leaf ``path`` at its full shape, chunked as ``chunks``, keeping every other
    part of the metadata Orbax wrote (dtype, codec, fill value)."""
    kvstore = {"driver": "file", "path": os.path.join(params_dir, leaf_name(path))}
    proxy_array = ts.open({"driver": "zarr", "kvstore": kvstore}, open=True, context=context).result()
    metadata = proxy_array.spec().to_json()["metadata"]
    metadata.update(shape=list(spec.shape), chunks=list(chunks))
    return ts.open(
        {"driver": "zarr", "kvstore": kvstore, "metadata": metadata},
        create=True,
        delete_existing=True,
        context=context,
    ).result()


# ----------------------------------------------------------------------------------------------- streaming
class ParamsWriter:
    """Write an Orbax ``params/`` checkpoint of a model slice by slice (see the module docstring).

    ``write(path, index, value)`` stores ``value`` at ``leaf[index]`` (``index`` = ``(repeat,)`` or
    ``(repeat, expert)`` for stacked layers, ``()`` for a whole leaf, slices for a block of one). Writes run in
    the background with at most ``max_pending_bytes`` (default 128 MiB) in flight. `close` waits, checks that
    every element of every leaf was written exactly once, and checks with Orbax's own metadata reader that shapes
    and dtypes are those of the model.
    """

    def __init__(self, params_dir: str, config: DeepseekConfig, *, max_pending_bytes: int = 2**27):
        self.params_dir = os.path.abspath(params_dir)
        state = nnx.state(abstract_model(config), nnx.Param)
        self.specs = specs = leaf_specs(config, state)
        like = nnx.to_pure_dict(state)
        self._max_pending = max_pending_bytes
        self._pending: list[tuple[Any, int, np.ndarray]] = []
        self._pending_bytes = 0
        self._written = dict.fromkeys(specs, 0)
        _orbax_skeleton(self.params_dir, specs, like)
        # No chunk cache (every chunk is written once) and many concurrent file writes, as Orbax configures them;
        # each chunk is synced as it is written, which overlaps disk write-back with the conversion.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_concurrency": {"limit": 128}})
        self._arrays = {}
        self._chunks = {path: _chunk_shape(spec) for path, spec in specs.items()}
        for path, spec in specs.items():
            self._arrays[path] = _full_size_array(self.params_dir, path, spec, self._chunks[path], self._context)

    def chunk_shape(self, path: LeafPath) -> tuple[int, ...]:
        return self._chunks[path]

    def write(self, path: LeafPath, index: tuple[int | slice, ...], value: np.ndarray) -> None:
        """Store ``value`` at ``leaf[index]`` (ints and slices, numpy style); any strides are fine."""
        spec = self.specs[path]
        region = self._arrays[path][index] if index else self._arrays[path]
        if tuple(value.shape) != tuple(region.shape) or np.dtype(value.dtype) != spec.dtype:
            raise AssertionError(
                f"{leaf_name(path)}{list(index)}: expected {tuple(region.shape)} {spec.dtype}, got {value.shape}"
            )
        future = region.write(value)
        # ``value`` (often a transposed view of a freshly read tensor) stays referenced until its write is done.
        self._pending.append((future, value.nbytes, value))
        self._pending_bytes += value.nbytes
        self._written[path] += value.size
        while self._pending_bytes > self._max_pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes, _ = self._pending.pop(0)
        self._pending_bytes -= nbytes
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 (TensorStore reports I/O failures such as a full disk as ValueError)
            raise CheckpointError(f"{self.params_dir}: writing failed ({e})") from None

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()

    def abort(self) -> None:
        """Wait for writes in flight (so no background thread touches the directory afterwards)."""
        for future, _, _ in self._pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001, S110 (the directory is being discarded)
                pass
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        for path, spec in self.specs.items():
            n = math.prod(spec.shape)
            if self._written[path] != n:
                raise AssertionError(f"{leaf_name(path)}: wrote {self._written[path]} of {n} elements")
        stored = _metadata_tree(ocp.StandardCheckpointer().metadata(self.params_dir))
        for path, spec in self.specs.items():
            meta = stored.get(path)
            if meta is None or tuple(meta.shape) != spec.shape or np.dtype(meta.dtype) != spec.dtype:
                raise CheckpointError(
                    f"{self.params_dir}: Orbax reads {leaf_name(path)} as "
                    f"{None if meta is None else (tuple(meta.shape), np.dtype(meta.dtype).name)}, expected "
                    f"{(spec.shape, spec.dtype.name)}"
                )


def _metadata_tree(metadata: Any) -> dict[LeafPath, Any]:
    """Flatten what ``StandardCheckpointer().metadata`` returns (a StepMetadata in recent Orbax, the tree itself in
    older releases) to path -> array metadata (with ``shape`` and ``dtype``)."""
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return {key_path(keys): v for keys, v in flat}


def params_dir_of(path: str | os.PathLike) -> str:
    """The ``params/`` directory of a model directory or a training step directory (``path`` itself if it is one)."""
    path = os.path.abspath(os.fspath(path))
    candidate = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(candidate) and os.path.basename(path) == PARAMS_DIR:
        candidate = path  # the params/ directory itself
    if os.path.isdir(candidate):
        if not os.path.isfile(os.path.join(candidate, "_METADATA")):
            raise CheckpointError(
                f"{candidate}: no _METADATA file, so this is not a complete Orbax checkpoint "
                "(an interrupted copy or save?); copy or convert it again"
            )
        return candidate
    raise CheckpointError(
        f"{path}: no {PARAMS_DIR}/ directory; expected a directory written by deepseekmoe-convert hf-to-jax or a "
        "training checkpoint step (a directory holding params/)"
    )


class ParamsReader:
    """Read slices of the parameter arrays of an Orbax ``params/`` directory without restoring whole leaves.

    Works on both storage layouts Orbax writes: one zarr array per leaf (converted checkpoints) and OCDBT (the
    default of ``StandardCheckpointer`` and ``CheckpointManager``, used by training checkpoints). Shapes and dtypes
    come from Orbax's metadata; the arrays are opened with TensorStore.
    """

    def __init__(self, path: str | os.PathLike):
        self.params_dir = params_dir_of(path)
        try:
            with quiet_missing_item_metadata():
                metadata = ocp.StandardCheckpointer().metadata(self.params_dir)
        except Exception as e:  # noqa: BLE001 (Orbax raises many types for unreadable directories)
            raise CheckpointError(f"{self.params_dir}: not a readable Orbax checkpoint ({e})") from None
        self.leaves = {p: m for p, m in _metadata_tree(metadata).items()}
        if not self.leaves:
            raise CheckpointError(f"{self.params_dir}: the Orbax checkpoint holds no arrays")
        self.use_ocdbt, self.use_zarr3, self.every_chunk_stored = self._storage_format()
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._open: dict[LeafPath, Any] = {}

    def _storage_format(self) -> tuple[bool, bool, bool]:
        """(OCDBT?, zarr3?, every chunk stored?). Orbax stores every chunk, even one equal to the fill value, and
        says so in ``_METADATA``; then a missing chunk is damage, and reading it must fail rather than give the
        fill value (zeros)."""
        meta_file = os.path.join(self.params_dir, "_METADATA")
        ocdbt = os.path.isfile(os.path.join(self.params_dir, "manifest.ocdbt"))
        zarr3 = every_chunk = False
        try:
            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
            ocdbt = bool(meta.get("use_ocdbt", ocdbt))
            zarr3 = bool(meta.get("use_zarr3", False))
            every_chunk = bool(meta.get("store_array_data_equal_to_fill_value", False))
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
        return ocdbt, zarr3, every_chunk

    def shape(self, path: LeafPath) -> tuple[int, ...]:
        return tuple(self.leaves[path].shape)

    def dtype(self, path: LeafPath) -> np.dtype:
        return np.dtype(self.leaves[path].dtype)

    @property
    def layout(self) -> str:
        return ("OCDBT" if self.use_ocdbt else "one array per leaf") + (", zarr3" if self.use_zarr3 else ", zarr")

    def _array(self, path: LeafPath):
        array = self._open.get(path)
        if array is None:
            name = leaf_name(path)
            if self.use_ocdbt:
                kvstore = {"driver": "ocdbt", "base": f"file://{self.params_dir}/", "path": name}
            else:
                kvstore = {"driver": "file", "path": os.path.join(self.params_dir, name)}
            spec = {
                "driver": "zarr3" if self.use_zarr3 else "zarr",
                "kvstore": kvstore,
                "fill_missing_data_reads": not self.every_chunk_stored,
            }
            try:
                array = ts.open(spec, open=True, read=True, context=self._context).result()
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{self.params_dir}: cannot open array {name} ({e})") from None
            self._open[path] = array
        return array

    def chunk_shape(self, path: LeafPath) -> tuple[int, ...]:
        """The stored chunk shape of a leaf (reading whole chunks avoids decoding one twice)."""
        return tuple(self._array(path).chunk_layout.read_chunk.shape)

    def read(self, path: LeafPath, index: tuple[int | slice, ...] = ()) -> np.ndarray:
        """``leaf[index]`` (ints and slices, numpy style) as a numpy array in the stored dtype."""
        future, _ = self.read_async(path, index)
        return self.result(path, index, future)

    def read_async(self, path: LeafPath, index: tuple[int | slice, ...] = ()) -> tuple[Any, int]:
        """Start reading ``leaf[index]``; returns (future, bytes). Pass the future to `result`."""
        array = self._array(path)
        region = array[index] if index else array
        return region.read(), math.prod(region.shape) * self.dtype(path).itemsize

    def result(self, path: LeafPath, index: tuple, future) -> np.ndarray:
        try:
            return np.asarray(future.result())
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.params_dir}: cannot read {leaf_name(path)}{list(index)} ({e})") from None

    def check_matches(self, config: DeepseekConfig, state: Any = None) -> dict[LeafPath, LeafSpec]:
        """Raise `CheckpointError` unless the stored arrays are exactly the parameters of ``config`` (any float
        dtype); returns the model's `leaf_specs` (``state``: the abstract parameters, if already built)."""
        specs = leaf_specs(config, state)
        for path, spec in specs.items():
            if path not in self.leaves:
                raise CheckpointError(
                    f"{self.params_dir}: no array {leaf_name(path)}, which config.json implies (shape "
                    f"{spec.shape}); the parameters and config.json belong to different models"
                )
            if self.shape(path) != spec.shape:
                raise CheckpointError(
                    f"{self.params_dir}: array {leaf_name(path)} has shape {self.shape(path)} but config.json implies "
                    f"{spec.shape}; the parameters and config.json belong to different models"
                )
            if not np.issubdtype(self.dtype(path), np.floating) and self.dtype(path).name != "bfloat16":
                raise CheckpointError(f"{self.params_dir}: array {leaf_name(path)} has dtype {self.dtype(path)}")
        extra = sorted(leaf_name(p) for p in self.leaves if p not in specs)
        if extra:
            raise CheckpointError(
                f"{self.params_dir}: {len(extra)} array(s) that config.json does not account for, e.g. {extra[0]}; "
                "the parameters and config.json belong to different models"
            )
        return specs

    def check_complete(self) -> None:
        """Raise `CheckpointError` naming the first missing chunk file of any array.

        Only for the one-array-per-leaf layout with every chunk stored (what the converter writes): there each chunk
        is a file, and a partial copy can lose some while the array still opens (and would read as zeros). OCDBT
        checkpoints keep their chunks in a few database files, whose loss Orbax and TensorStore report themselves.
        """
        if self.use_ocdbt or self.use_zarr3 or not self.every_chunk_stored:
            return  # zarr3 chunk keys depend on the chunk-key encoding; TensorStore reports missing ones on read
        for path in sorted(self.leaves, key=leaf_name):
            array_dir = os.path.join(self.params_dir, leaf_name(path))
            try:
                with open(os.path.join(array_dir, ".zarray"), encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.params_dir}: array {leaf_name(path)} is unreadable ({e})") from None
            sep = meta.get("dimension_separator") or "."
            grid = [
                range(-(-n // max(c, 1))) for n, c in zip(meta.get("shape", []), meta.get("chunks", []), strict=False)
            ]
            present = set(os.listdir(array_dir)) if sep == "." else None
            for cell in itertools.product(*grid):
                key = sep.join(str(i) for i in cell) or "0"
                found = key in present if present is not None else os.path.isfile(os.path.join(array_dir, key))
                if not found:
                    raise CheckpointError(
                        f"{self.params_dir}: array {leaf_name(path)} is missing its chunk file {key} (chunk "
                        f"{list(cell)} of a {[len(g) for g in grid]} grid); the checkpoint was not copied or "
                        "written completely, so convert or copy it again"
                    )

    def iter_leaves(self) -> Iterator[tuple[LeafPath, tuple[int, ...], np.dtype]]:
        for path in sorted(self.leaves, key=leaf_name):
            yield path, self.shape(path), self.dtype(path)


def model_from_params(config: DeepseekConfig, params: dict[LeafPath, Any]):
    """A `DeepseekForCausalLM` of ``config`` whose parameters are ``params`` (path -> array, every path of
    `leaf_specs`), cast to ``config.options.param_dtype``."""
    graphdef, state, rest = nnx.split(abstract_model(config), nnx.Param, ...)
    pd = jnp.dtype(config.options.param_dtype)
    nested = _nested({p: jnp.asarray(v, pd) for p, v in params.items()}, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state, rest)
