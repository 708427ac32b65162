"""``jax-to-hf``: a JAX model directory (converted, or a training checkpoint step) -> a Hugging Face checkpoint.

The output is the DeepSeekMoE v1 layout (per-expert keys, torch ``[out, in]`` weights) as safetensors shards of at
most ``max_shard_size`` with ``model.safetensors.index.json`` (one ``model.safetensors`` when everything fits in one
shard), ``config.json`` with ``model_type: "deepseek"``, and the tokenizer files. Parameters are read one layer
slice at a time (`deepseekmoe_jax.param_store.ParamsReader`), with a bounded read-ahead, and each tensor is appended
to its shard as soon as it is produced (`deepseekmoe_jax.hf_io.SafetensorsWriter`), so memory does not depend on
the model's size.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import deepseekmoe_jax.convert.common as common
from deepseekmoe_jax.checkpoint import CONFIG_FILE, METADATA_FILE, find_config_dir, read_config
from deepseekmoe_jax.convert.common import (
    SIDE_FILES,
    check_output,
    copy_side_files,
    human_bytes,
    log,
    progress_bar,
    remote_code_files,
    row_axis,
    row_blocks,
    staging_dir,
    with_stored_dtype,
)
from deepseekmoe_jax.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    SAFE_INDEX,
    PlannedTensor,
    SafetensorsWriter,
    dtype_label,
    numpy_dtype,
    plan_shards,
    shard_file_names,
    write_index,
)
from deepseekmoe_jax.hf_weights import hf_key_shapes, iter_targets
from deepseekmoe_jax.param_store import ParamsReader, leaf_path

READ_AHEAD_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    out_dir: str
    files: tuple[str, ...]
    tensors: int
    total_bytes: int
    dtype: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One write into the output: ``take`` of the region ``read`` of leaf ``path``, transformed by ``to_hf``; the
    whole HF tensor ``key`` or one block of its rows (``last`` marks its final block)."""

    key: str
    path: tuple[str, ...]
    read: tuple
    take: tuple | None
    to_hf: Any
    nbytes: int
    last: bool


def _pieces(reader: ParamsReader, plan: list[PlannedTensor], targets: dict, config) -> Iterator[_Piece]:
    """The reads that produce the HF tensors in ``plan`` order.

    Stacked leaves are read per expert where each expert is stored in its own chunks (the converted layout), else
    one layer's slab at a time (training layouts chunk across experts), shared by that layer's experts. Large
    global tensors (embedding, LM head) whose rule is an identity or a transpose are read in blocks of HF rows,
    aligned to the stored chunks where possible.
    """
    for t in plan:
        target = targets[t.key]
        path = leaf_path(target.path)
        to_hf = target.rule.to_hf
        if target.index:
            per_item = len(target.index) > 1 and reader.chunk_shape(path)[1] == 1
            read = target.index if per_item else target.index[:1]
            take = None if per_item or len(target.index) == 1 else target.index[1:]
            yield _Piece(t.key, path, read, take, to_hf, t.nbytes, True)
            continue
        axis = row_axis(to_hf, config) if len(t.shape) == 2 and t.nbytes > common.BLOCK_BYTES else None
        if axis is None:
            yield _Piece(t.key, path, (), None, to_hf, t.nbytes, True)
            continue
        rows = t.shape[0]
        chunk = reader.chunk_shape(path)[axis]
        step = max(1, common.BLOCK_BYTES // max(1, t.nbytes // rows))
        step = max(chunk, step // chunk * chunk) if chunk < rows else step
        blocks = row_blocks(rows, step)
        for n, (a, b) in enumerate(blocks):
            region = (slice(a, b),) if axis == 0 else (slice(None), slice(a, b))
            yield _Piece(t.key, path, region, None, to_hf, t.nbytes * (b - a) // rows, n == len(blocks) - 1)


def _read_ahead(reader: ParamsReader, pieces: Iterator[_Piece], ahead_bytes: int) -> Iterator[tuple[_Piece, Any]]:
    """Yield each piece with its region as a numpy array, keeping reads of the next pieces (up to ``ahead_bytes``)
    in flight so that decompression and disk reads overlap with writing. Consecutive pieces reading the same
    region share one read."""
    queue: collections.deque = collections.deque()  # (piece, future or None when sharing the previous read)
    in_flight = 0
    last_read = None
    pieces = iter(pieces)
    exhausted = False
    current = None
    while True:
        while not exhausted and (not queue or in_flight < ahead_bytes):
            piece = next(pieces, None)
            if piece is None:
                exhausted = True
                break
            if (piece.path, piece.read) == last_read:
                queue.append((piece, None, 0))
                continue
            future, nbytes = reader.read_async(piece.path, piece.read)
            last_read = (piece.path, piece.read)
            queue.append((piece, future, nbytes))
            in_flight += nbytes
        if not queue:
            return
        piece, future, nbytes = queue.popleft()
        if future is not None:
            current = None  # release the previous region before waiting for the next
            current = reader.result(piece.path, piece.read, future)
            in_flight -= nbytes
        yield piece, current


def convert_jax_to_hf(
    ckpt_dir: str,
    out_dir: str,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportSummary:
    """Write the parameters of ``ckpt_dir`` (a directory holding ``params/``) as a HF checkpoint in ``out_dir``.

    Args:
      dtype: dtype of the written tensors ("bfloat16", "float32", "float16"); default: the stored dtype.
      max_shard_bytes: largest safetensors shard (a larger single tensor gets a shard of its own).
      overwrite: replace an existing ``out_dir`` (only once the new one is complete).
      progress: show a tqdm progress bar (bytes and tensors).
    """
    start = time.time()
    ckpt_dir = os.path.abspath(ckpt_dir)
    out_dir = os.path.abspath(out_dir)
    reader = ParamsReader(ckpt_dir)
    config_dir = find_config_dir(os.path.dirname(reader.params_dir))
    config = read_config(config_dir)
    # What is read: the parameters and the files next to the config (a run directory also holds other things, so
    # an output elsewhere inside it is fine).
    names = (CONFIG_FILE, METADATA_FILE, *SIDE_FILES, *remote_code_files(config))
    read_files = [os.path.join(config_dir, n) for n in names]
    inputs = (ckpt_dir, *(p for p in read_files if os.path.lexists(p)))
    check_output(out_dir, inputs, overwrite=overwrite)
    reader.check_matches(config)
    reader.check_complete()
    stored = reader.dtype(("model", "embed_tokens"))
    out_dtype = numpy_dtype(dtype) if dtype else stored
    shapes = hf_key_shapes(config)
    targets = dict(iter_targets(config))
    plan = [PlannedTensor(key, shapes[key], out_dtype) for key in targets]
    shards = plan_shards(plan, max_shard_bytes)
    names = shard_file_names(len(shards))
    total = sum(t.nbytes for t in plan)
    log(
        f"jax-to-hf: {ckpt_dir} ({reader.layout}, {dtype_label(stored)}) -> {out_dir} ({len(plan)} tensors, "
        f"{human_bytes(total)} {dtype_label(out_dtype)}, {len(names)} file(s))"
    )
    with staging_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        bar = progress_bar(total, len(plan), "jax-to-hf", progress)
        pieces = _read_ahead(reader, _pieces(reader, plan, targets, config), READ_AHEAD_BYTES)
        try:
            for shard, name in zip(shards, names, strict=True):
                with SafetensorsWriter(os.path.join(tmp, name), shard) as writer:
                    done = 0
                    while done < len(shard):
                        piece, region = next(pieces)
                        value = region if piece.take is None else region[piece.take]
                        value = piece.to_hf(value.astype(out_dtype, copy=False), config)
                        writer.write(piece.key, value)  # the writer makes it contiguous
                        bar.step(piece.nbytes, tensor_done=piece.last)
                        done += piece.last
        finally:
            bar.close()
        if len(shards) > 1:
            write_index(tmp, shards, names)
        with_stored_dtype(config, dtype_label(out_dtype)).save_hf(os.path.join(tmp, "config.json"))
        copied = copy_side_files(config_dir, tmp, config)
    seconds = time.time() - start
    log(
        f"jax-to-hf: wrote {out_dir}: {', '.join(names)}{' + ' + SAFE_INDEX if len(names) > 1 else ''}, config.json"
        f"{', ' + ', '.join(copied) if copied else ''} in {seconds:.1f} s"
    )
    return ExportSummary(out_dir, tuple(names), len(plan), total, dtype_label(out_dtype), seconds)
