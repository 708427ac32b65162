"""``jax-to-hf``: a JAX model directory (converted, or a training checkpoint step) -> a Hugging Face checkpoint.

The output is the DeepSeekMoE v1 layout (per-expert keys, torch ``[out, in]`` weights) as safetensors shards of at
most ``max_shard_size`` with ``model.safetensors.index.json`` (one ``model.safetensors`` when everything fits in one
shard), ``config.json`` with ``model_type: "deepseek"``, and the tokenizer files. Parameters are read one layer
slice at a time (`deepseekmoe_jax.checkpoint.ParamsReader`) and each tensor is appended to its shard as soon as it
is produced (`deepseekmoe_jax.hf_io.SafetensorsWriter`), so memory stays at about one stacked leaf of one layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from convert import common
from convert.common import (
    ConvertError,
    copy_side_files,
    human_bytes,
    log,
    progress_bar,
    row_axis,
    row_blocks,
    staging_dir,
)
from deepseekmoe_jax.checkpoint import ParamsReader, find_config_dir, leaf_path, read_config
from deepseekmoe_jax.hf_io import (
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

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", the size HF's save_pretrained uses


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    out_dir: str
    files: tuple[str, ...]
    tensors: int
    total_bytes: int
    dtype: str
    seconds: float


def _export_in_blocks(reader, path, planned, target, config, dtype, writer, bar) -> None:
    """Write a large global tensor (embedding, LM head) whose rule is an identity or a transpose in blocks of HF
    rows, each read as one region of the stored leaf (whole stored chunks where the layout allows)."""
    axis = row_axis(target.rule.to_hf, config)
    rows = planned.shape[0]
    chunk = reader.chunk_shape(path)[axis]
    step = max(1, common.BLOCK_BYTES // max(1, planned.nbytes // rows))
    step = max(chunk, step // chunk * chunk) if chunk < rows else step
    blocks = row_blocks(rows, step)
    for n, (start, stop) in enumerate(blocks):
        index = (slice(start, stop),) if axis == 0 else (slice(None), slice(start, stop))
        value = reader.read(path, index).astype(dtype, copy=False)
        writer.write(planned.key, target.rule.to_hf(value, config))
        bar.step(planned.nbytes * (stop - start) // rows, tensor_done=n == len(blocks) - 1)


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
    if os.path.lexists(out_dir) and not overwrite:
        raise ConvertError(f"{out_dir} already exists; choose another OUT_DIR or pass --overwrite to replace it")
    reader = ParamsReader(ckpt_dir)
    config_dir = find_config_dir(os.path.dirname(reader.params_dir))
    config = read_config(config_dir)
    reader.check_matches(config)
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
    with staging_dir(out_dir, overwrite=overwrite, inputs=(ckpt_dir, config_dir)) as tmp:
        bar = progress_bar(total, len(plan), "jax-to-hf", progress)
        slab_key, slab = None, None  # one layer's slice of one stacked leaf, shared by that layer's experts
        try:
            for shard, name in zip(shards, names, strict=True):
                with SafetensorsWriter(os.path.join(tmp, name), shard) as writer:
                    for t in shard:
                        target = targets[t.key]
                        path = leaf_path(target.path)
                        if target.index:
                            if slab_key != (path, target.index[0]):
                                slab_key, slab = None, None  # release the previous slab before reading the next
                                slab = reader.read(path, target.index[:1]).astype(out_dtype, copy=False)
                                slab_key = (path, target.index[0])
                            value = slab[target.index[1:]] if len(target.index) > 1 else slab
                        elif t.nbytes > common.BLOCK_BYTES and row_axis(target.rule.to_hf, config) is not None:
                            _export_in_blocks(reader, path, t, target, config, out_dtype, writer, bar)
                            continue
                        else:
                            value = reader.read(path).astype(out_dtype, copy=False)
                        writer.write(t.key, target.rule.to_hf(value, config))  # the writer makes it contiguous
                        bar.step(t.nbytes)
        finally:
            bar.close()
        if len(shards) > 1:
            write_index(tmp, shards, names)
        hf = config.to_hf()
        hf["torch_dtype"] = dtype_label(out_dtype)
        if "dtype" in hf:
            hf["dtype"] = dtype_label(out_dtype)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
            f.write("\n")
        copied = copy_side_files(config_dir, tmp, config)
    seconds = time.time() - start
    log(
        f"jax-to-hf: wrote {out_dir}: {', '.join(names)}{' + ' + SAFE_INDEX if len(names) > 1 else ''}, config.json"
        f"{', ' + ', '.join(copied) if copied else ''} in {seconds:.1f} s"
    )
    return ExportSummary(out_dir, tuple(names), len(plan), total, dtype_label(out_dtype), seconds)
