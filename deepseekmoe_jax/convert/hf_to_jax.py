"""``hf-to-jax``: a Hugging Face DeepSeekMoE v1 checkpoint directory -> a JAX model directory, streaming.

Every tensor is read on its own (`deepseekmoe_jax.hf_io`), mapped through the shared key table
(`deepseekmoe_jax.hf_weights`: transposes, per-head splits, per-expert and per-layer stacking) and written into
its slice of the scan-stacked Orbax arrays (`deepseekmoe_jax.param_store.ParamsWriter`). Before anything is
written, the whole checkpoint is checked against config.json: every key consumed exactly once, every parameter
produced exactly once, every shape and dtype as expected.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

import deepseekmoe_jax.convert.common as common
from deepseekmoe_jax.checkpoint import write_config_files
from deepseekmoe_jax.config import ConfigError, DeepseekConfig
from deepseekmoe_jax.convert.common import (
    ConvertError,
    check_output,
    config_fields,
    copy_side_files,
    declared_dtype,
    default_dtype,
    human_bytes,
    log,
    progress_bar,
    row_axis,
    row_blocks,
    staging_dir,
    with_stored_dtype,
)
from deepseekmoe_jax.hf_io import HFCheckpoint, iter_file_order, numpy_dtype, unreadable_dtype_error
from deepseekmoe_jax.hf_weights import KeyTarget, hf_key_shapes, is_ignored_key, iter_targets, key_fields
from deepseekmoe_jax.param_store import PARAMS_DIR, ParamsWriter, leaf_path


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    out_dir: str
    tensors: int
    source_bytes: int
    param_count: int
    dtype: str
    seconds: float
    ignored_keys: tuple[str, ...]


def _hint(key: str, config: DeepseekConfig) -> str:
    """The config.json fields behind ``key`` with their values, e.g. ``n_routed_experts=16, hidden_size=32``."""
    return config_fields(config, key_fields(key, config))


def _searched(ckpt: HFCheckpoint) -> str:
    """Where the tensors of ``ckpt`` were looked up: its index file and shards, or its single weight file."""
    if ckpt.index_file is None:
        return os.path.join(ckpt.directory, ckpt.files[0])
    return f"{os.path.join(ckpt.directory, ckpt.index_file)} (and its {len(ckpt.files)} shard(s))"


def check_against_config(ckpt: HFCheckpoint, config: DeepseekConfig) -> dict[str, KeyTarget]:
    """Match the checkpoint's tensors against what ``config`` needs; return HF key -> target.

    Raises `ConvertError` (one line) on the first shape mismatch, on missing or unexpected keys (rotary
    ``inv_freq`` buffers are ignored) and on tensors of a dtype this tool cannot read.
    """
    targets = dict(iter_targets(config))
    shapes = hf_key_shapes(config)
    present = ckpt.tensors
    for key in targets:
        info = present.get(key)
        if info is not None and info.shape != shapes[key]:
            raise ConvertError(
                f"{ckpt.path(key)}: tensor {key} has shape {info.shape} but config.json "
                f"({_hint(key, config)}) implies {shapes[key]}; either config.json does not describe these "
                "weights (use the config.json that came with them) or the file is damaged"
            )
    missing = [k for k in targets if k not in present]
    if missing:
        k = missing[0]
        raise ConvertError(
            f"{_searched(ckpt)}: {len(missing)} tensor(s) that config.json requires are missing, e.g. {k} of "
            f"shape {shapes[k]} (config.json has {_hint(k, config)}); the checkpoint is incomplete or config.json "
            "describes a different model"
        )
    unexpected = [k for k in present if k not in targets and not is_ignored_key(k)]
    if unexpected:
        k = unexpected[0]
        raise ConvertError(
            f"{ckpt.path(k)}: {len(unexpected)} tensor(s) that config.json does not account for, e.g. {k} "
            f"(config.json has {_hint(k, config)}); config.json describes a different model or these are not "
            "DeepSeekMoE v1 weights"
        )
    for key in targets:
        if not present[key].readable:
            raise ConvertError(str(unreadable_dtype_error(present[key], ckpt.path(key))))
    return targets


class _NonFinite:
    """Counts NaN/inf values per HF key while tensors stream through `_convert_tensor` (no second read)."""

    def __init__(self, ckpt: HFCheckpoint, dtype: np.dtype, refuse: bool):
        self.ckpt, self.dtype, self.refuse = ckpt, dtype, refuse
        self.counts: dict[str, int] = {}
        self.overflow: dict[str, int] = {}

    def check(self, key: str, source: np.ndarray, converted: np.ndarray, rows: tuple[int, int] | None) -> None:
        bad = int(source.size - np.count_nonzero(np.isfinite(source)))
        made = 0
        if converted.dtype != source.dtype and converted.dtype.itemsize <= source.dtype.itemsize:  # may overflow
            made = int(converted.size - np.count_nonzero(np.isfinite(converted))) - bad
        if bad == 0 and made <= 0:
            return
        where = "" if rows is None else f" (rows {rows[0]}..{rows[1] - 1})"
        if self.refuse:
            if bad:
                raise ConvertError(
                    f"{self.ckpt.path(key)}: tensor {key} holds {bad:,} non-finite value(s) (NaN or inf){where}; "
                    "the checkpoint is damaged or diverged in training: re-download it or use an earlier checkpoint"
                )
            raise ConvertError(
                f"{self.ckpt.path(key)}: tensor {key} has {made:,} value(s){where} too large for "
                f"{self.dtype.name}, which would become inf: convert with --dtype float32 or bfloat16"
            )
        if bad:
            self.counts[key] = self.counts.get(key, 0) + bad
        if made > 0:
            self.overflow[key] = self.overflow.get(key, 0) + made

    def report(self) -> None:
        for key, n in self.counts.items():
            size = int(np.prod(self.ckpt.tensors[key].shape))
            log(
                f"warning: {self.ckpt.path(key)}: tensor {key} holds {n:,} non-finite value(s) (NaN or inf) of "
                f"{size:,}; converted as they are"
            )
        for key, n in self.overflow.items():
            log(
                f"warning: {self.ckpt.path(key)}: tensor {key} has {n:,} value(s) too large for {self.dtype.name}; "
                "they became inf (convert with --dtype float32 or bfloat16 to keep them)"
            )
        if self.counts or self.overflow:
            log(
                f"warning: {len(self.counts.keys() | self.overflow.keys())} tensor(s) hold non-finite values, so the "
                "converted model computes NaN/inf; --refuse-nonfinite makes this an error"
            )


def _convert_tensor(ckpt, key, target, config, dtype, writer, bar, nonfinite: _NonFinite) -> None:
    """Read one HF tensor, transform it by its key-table rule and write it into its slice of the JAX leaf.

    The cast happens while the tensor is contiguous; the layout transform then yields a (usually transposed) view
    that the writer copies into its chunks with TensorStore's strided copy. Large global tensors (embedding, LM
    head) whose rule is an identity or a transpose go through in blocks of rows, one output chunk at a time. Each
    piece read is checked for NaN/inf (`_NonFinite`) before it is written.
    """
    info = ckpt.tensors[key]
    path = leaf_path(target.path)
    axis = row_axis(target.rule.to_jax, config) if len(info.shape) == 2 and not target.index else None
    if axis is None or info.nbytes <= common.BLOCK_BYTES:
        source = ckpt.read(key)
        with np.errstate(over="ignore"):
            value = source.astype(dtype, copy=False)
        nonfinite.check(key, source, value, None)
        writer.write(path, target.index, target.rule.to_jax(value, config))
        bar.step(info.nbytes)
        return
    blocks = row_blocks(info.shape[0], writer.chunk_shape(path)[axis])
    for n, (start, stop) in enumerate(blocks):
        source = ckpt.read(key, (start, stop))
        with np.errstate(over="ignore"):
            value = source.astype(dtype, copy=False)
        nonfinite.check(key, source, value, (start, stop))
        index = (slice(start, stop),) if axis == 0 else (slice(None), slice(start, stop))
        writer.write(path, index, target.rule.to_jax(value, config))
        bar.step(info.nbytes * (stop - start) // info.shape[0], tensor_done=n == len(blocks) - 1)


def read_hf_config(hf_dir: str) -> DeepseekConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: no such directory")
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: missing; a HF checkpoint directory must contain config.json")
    try:
        config = DeepseekConfig.from_hf(path)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    declared_dtype(config, path)  # a torch_dtype / dtype that names no dtype is refused here, for every command
    return config


def convert_hf_to_jax(
    hf_dir: str,
    out_dir: str,
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    refuse_nonfinite: bool = False,
) -> ConversionSummary:
    """Convert the HF checkpoint in ``hf_dir`` into a JAX model directory ``out_dir``.

    Args:
      dtype: parameter dtype to store ("bfloat16", "float32", "float16"); default: the checkpoint's
        ``torch_dtype``, else bfloat16. Widening (bfloat16 -> float32) is exact.
      compute_dtype: ``options.dtype`` recorded for the model (activations); default: ``dtype``, i.e. the model
        runs in its checkpoint dtype as in PyTorch.
      overwrite: replace an existing ``out_dir`` (only once the new one is complete).
      progress: show a tqdm progress bar (bytes and tensors).
      refuse_nonfinite: stop with `ConvertError` at the first tensor holding NaN/inf (or values that overflow
        ``dtype``); by default such tensors are converted as they are, with one warning line per HF key.

    Peak memory is one tensor (or one 16 MiB block of the embedding / LM head) plus at most 128 MiB of writes in
    flight (held about three times over while being copied and compressed), whatever the model's depth.
    """
    start = time.time()
    hf_dir = os.path.abspath(hf_dir)
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, (hf_dir,), overwrite=overwrite)
    base = read_hf_config(hf_dir)
    dtype = dtype or default_dtype(base, os.path.join(hf_dir, "config.json"))
    config = base.with_options(param_dtype=dtype, dtype=compute_dtype or dtype)
    target_dtype = numpy_dtype(dtype)
    with HFCheckpoint.open(hf_dir) as ckpt:
        targets = check_against_config(ckpt, config)
        ignored = tuple(k for k in ckpt.tensors if k not in targets)
        source_bytes = sum(ckpt.tensors[k].nbytes for k in targets)
        log(
            f"hf-to-jax: {hf_dir} ({ckpt.layout}, {len(ckpt.files)} file(s), {len(targets)} tensors, "
            f"{human_bytes(source_bytes)}) -> {out_dir} ({dtype})"
        )
        with staging_dir(out_dir, overwrite=overwrite, inputs=(hf_dir,)) as tmp:
            writer = ParamsWriter(os.path.join(tmp, PARAMS_DIR), config)
            bar = progress_bar(source_bytes, len(targets), "hf-to-jax", progress)
            nonfinite = _NonFinite(ckpt, target_dtype, refuse_nonfinite)
            try:
                for key in iter_file_order(ckpt, targets):
                    _convert_tensor(ckpt, key, targets[key], config, target_dtype, writer, bar, nonfinite)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
            nonfinite.report()
            count = sum(int(np.prod(s.shape)) for s in writer.specs.values())
            write_config_files(
                tmp,
                with_stored_dtype(config, dtype),
                {
                    "param_dtype": dtype,
                    "param_count": count,
                    "source": {"layout": ckpt.layout, "files": ckpt.files, "ignored_keys": list(ignored)},
                },
            )
            copied = copy_side_files(hf_dir, tmp, config)
    seconds = time.time() - start
    log(
        f"hf-to-jax: wrote {out_dir}: {count:,} parameters ({dtype}), copied {copied or 'no tokenizer files'}"
        + (f", ignored {len(ignored)} rotary buffer(s)" if ignored else "")
        + f" in {seconds:.1f} s ({source_bytes / 2**20 / max(seconds, 1e-9):.0f} MiB/s)"
    )
    return ConversionSummary(out_dir, len(targets), source_bytes, count, dtype, seconds, ignored)
