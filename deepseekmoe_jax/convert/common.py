"""Pieces shared by the conversion commands: errors, atomic output directories, side files, logging, progress."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator

import jax
import numpy as np

import deepseekmoe_jax
from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.fs import fsync_tree, make_staging_dir, overlapping_input, publish_directory, remove_stale_staging

DTYPE_CHOICES = ("bfloat16", "float32", "float16")

# Files a checkpoint directory carries besides config.json and the weights; copied through both directions so that
# every output directory is self-contained.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)


class ConvertError(ValueError):
    """A user-facing conversion problem; the message is one line naming the path/key and what to do."""


def log(message: str) -> None:
    """Progress and summary lines go to stderr so that stdout stays clean for `inspect` output."""
    print(message, file=sys.stderr, flush=True)


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def limit_heap_growth() -> None:
    """Serve allocations of 1 MiB and more with their own memory maps, returned to the system when freed.

    Streaming allocates and frees thousands of tensor-sized buffers on several threads; glibc's adaptive
    threshold would move them onto the heap, where fragmentation makes the resident size creep up with every
    layer converted. A fixed threshold keeps the peak independent of the model's depth. No-op off glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def versions_line(devices: bool = True) -> str:
    """One line with the versions that matter for reproducing a conversion, and the JAX devices."""
    parts = [
        f"deepseekmoe-jax {deepseekmoe_jax.__version__}",
        f"python {platform.python_version()}",
        f"jax {jax.__version__}",
        f"orbax-checkpoint {_version('orbax-checkpoint')}",
        f"tensorstore {_version('tensorstore')}",
        f"numpy {_version('numpy')}",
    ]
    if "torch" in sys.modules:
        parts.append(f"torch {_version('torch')}")
    if devices:
        devs = jax.devices()
        parts.append(f"devices {len(devs)} x {devs[0].platform}" + (f" ({devs[0].device_kind})" if devs else ""))
    return " | ".join(parts)


def declared_dtype(config: DeepseekConfig, source: str | None = None) -> str | None:
    """The dtype config.json declares for its weights (``torch_dtype``, else the newer ``dtype``), or None when
    neither field is set. A value that is not one of `DTYPE_CHOICES` (``"float77"``, ``5``, a list) raises
    `ConvertError` naming ``source`` (the config.json path), the field and the accepted values."""
    meta = config.hf_metadata
    found = None
    for key in ("torch_dtype", "dtype"):
        value = meta.get(key)
        if value is None:
            continue
        name = value.removeprefix("torch.") if isinstance(value, str) else None
        if name not in DTYPE_CHOICES:
            accepted = ", ".join(f'"{d}"' for d in DTYPE_CHOICES)
            raise ConvertError(
                f"{source or 'config.json'}: field {key} is {json.dumps(value)}; expected one of {accepted} "
                '(optionally "torch."-prefixed) or null: set it to the dtype the weights were saved in'
            )
        found = found or name
    return found


def default_dtype(config: DeepseekConfig, source: str | None = None) -> str:
    """The checkpoint's own ``torch_dtype`` (or ``dtype``) from config.json, else bfloat16 when neither is set; a
    value that names no dtype we store is refused (`declared_dtype`)."""
    return declared_dtype(config, source) or "bfloat16"


def with_stored_dtype(config: DeepseekConfig, dtype: str) -> DeepseekConfig:
    """``config`` whose config.json records ``dtype`` as the weights' dtype: ``torch_dtype`` always (as
    ``save_pretrained`` writes it) and ``dtype`` where the source file had that newer key too, so that a loader
    reading config.json sees the dtype the parameters are actually stored in."""
    meta = dict(config.hf_metadata)
    meta["torch_dtype"] = dtype
    if "dtype" in meta:
        meta["dtype"] = dtype
    return config.replace(hf_metadata=meta)


def check_output(out_dir: str, inputs: tuple[str, ...] = (), *, overwrite: bool) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (writing it would rewrite or delete what
    the command reads, or put the output among its own inputs), and an existing output without ``overwrite``."""
    out_dir = os.path.abspath(out_dir)
    src = overlapping_input(out_dir, inputs)
    if src is not None:
        src = os.path.abspath(src)
        if os.path.realpath(out_dir) == os.path.realpath(src):
            how = "is"
        elif os.path.realpath(src).startswith(os.path.realpath(out_dir).rstrip(os.sep) + os.sep):
            how = "contains"
        else:
            how = "lies inside"
        raise ConvertError(
            f"{out_dir}: the output {how} the input {src} and would replace or change it; choose an OUT_DIR "
            "outside the input"
        )
    if os.path.lexists(out_dir) and not overwrite:
        raise ConvertError(f"{out_dir} already exists; choose another OUT_DIR or pass --overwrite to replace it")


@contextlib.contextmanager
def staging_dir(out_dir: str, *, overwrite: bool, inputs: tuple[str, ...] = ()) -> Iterator[str]:
    """A fresh temporary directory next to ``out_dir`` that becomes ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is refused unless ``overwrite``; with ``overwrite`` it is replaced only after the new
    one is complete. On any error (or Ctrl-C) the temporary directory is removed and ``out_dir`` is untouched.
    ``inputs`` are the files and directories the command reads; ``out_dir`` may not be one of them, contain one or
    lie inside one (`check_output`). Staging directories of ``out_dir`` left behind by a killed run (their writer
    process is gone) are removed first, one log line each.
    """
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, inputs, overwrite=overwrite)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{parent}: cannot create the output's parent directory ({e.strerror})") from None
    for stale in remove_stale_staging(out_dir):
        log(f"removed {stale}: a staging directory of {os.path.basename(out_dir)} left by an interrupted run")
    tmp = make_staging_dir(out_dir)
    try:
        yield tmp
        fsync_tree(tmp)
        publish_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remote_code_files(config: DeepseekConfig) -> list[str]:
    """The ``*.py`` files named by config.json's ``auto_map`` (``trust_remote_code`` loading)."""
    auto_map = config.hf_metadata.get("auto_map") or {}
    files = []
    for ref in auto_map.values() if isinstance(auto_map, dict) else ():
        refs = ref if isinstance(ref, list) else [ref]
        for r in refs:
            if isinstance(r, str) and "." in r:
                module = r.split("--")[-1].rsplit(".", 1)[0]
                name = module.replace(".", "/") + ".py"
                if os.path.basename(name) == name and name not in files:
                    files.append(name)
    return files


def copy_side_files(src_dir: str, dst_dir: str, config: DeepseekConfig) -> list[str]:
    """Copy tokenizer files, generation_config.json and auto_map code files that exist in ``src_dir``."""
    copied = []
    for name in (*SIDE_FILES, *remote_code_files(config)):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


# Tensors above this size are moved in blocks of rows rather than whole (the 16B embedding and LM head are 400 MB
# each in bfloat16; whole, they would set the peak memory of the conversion).
BLOCK_BYTES = 16 * 2**20


def row_axis(transform, config) -> int | None:
    """For a 2-D tensor: the axis of the transformed tensor along which the source's rows run, if ``transform``
    (a key-table ``to_jax``/``to_hf``) is the identity (0) or a transpose (1); otherwise None.

    Found by applying the transform to a small probe, so it follows the key table rather than restating it.
    """
    probe = np.arange(12, dtype=np.float32).reshape(4, 3)
    try:
        out = np.asarray(transform(probe, config))
    except (ValueError, TypeError):
        return None
    if out.shape == probe.shape and np.array_equal(out, probe):
        return 0
    if out.shape == probe.T.shape and np.array_equal(out, probe.T):
        return 1
    return None


def row_blocks(rows: int, step: int) -> list[tuple[int, int]]:
    step = max(1, step)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def progress_bar(total_bytes: int, total_tensors: int, desc: str, enabled: bool):
    """A tqdm bar counting bytes, with ``done/total tensors`` in its postfix."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        # tqdm's default shows sizes without their unit ("57.1k/57.1k"); spell out that they count bytes.
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}{unit}/{total_fmt}{unit} "
        "[{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    bar.total_tensors = total_tensors
    bar.tensors_done = 0

    def step(nbytes: int, tensor_done: bool = True) -> None:
        if tensor_done:
            bar.tensors_done += 1
            bar.set_postfix_str(f"{bar.tensors_done}/{total_tensors} tensors", refresh=False)
        bar.update(nbytes)

    bar.step = step
    return bar


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def config_fields(config: DeepseekConfig, names: tuple[str, ...]) -> str:
    return ", ".join(f"{n}={json.dumps(getattr(config, n))}" for n in names)
