"""Model directories: their layout, their config files, and saving and loading whole models with Orbax.

A model directory (what ``deepseekmoe-convert hf-to-jax`` writes, and what every training checkpoint step holds)::

    DIR/
      config.json            the HF config (DeepseekConfig.to_hf())
      deepseekmoe_jax.json   project metadata: format version, ModelOptions, parameter dtype and count
      params/                an Orbax PyTree checkpoint of the model parameters: a nested dict shaped like
                             ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (scan-stacked layers)
      tokenizer.json ...     tokenizer files, when known

`read_config` also looks one and two levels up for the config files, so a training run directory
``RUN/config.json`` serves its step checkpoints ``RUN/checkpoints/<step>/params``.

What the leaves of ``params/`` are, and reading or writing them slice by slice without holding a whole leaf (the
converter), is `deepseekmoe_jax.param_store`; `load_checkpoint` uses its reader to check a directory before
restoring it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from deepseekmoe_jax.config import ConfigError, DeepseekConfig, ModelOptions
from deepseekmoe_jax.distributed import is_main_process, process_count
from deepseekmoe_jax.fs import (
    make_staging_dir,
    publish_directory,
    read_json,
    remove_stale_staging,
    write_text_atomically,
)
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.param_store import PARAMS_DIR, CheckpointError, ParamsReader, quiet_missing_item_metadata
from deepseekmoe_jax.partitioning import rules_for
from deepseekmoe_jax.sharding import check_mesh_fits, param_shardings

CONFIG_FILE = "config.json"
METADATA_FILE = "deepseekmoe_jax.json"
FORMAT_VERSION = 1


def write_config_files(
    directory: str | os.PathLike, config: DeepseekConfig, extra: dict[str, Any] | None = None
) -> None:
    """Write ``config.json`` (HF) and ``deepseekmoe_jax.json`` (format version, options, ``extra``), each written
    aside and renamed into place."""
    directory = os.fspath(directory)
    config.save_hf(os.path.join(directory, CONFIG_FILE))
    meta = {"format_version": FORMAT_VERSION, "options": config.options.to_dict(), **(extra or {})}
    write_text_atomically(os.path.join(directory, METADATA_FILE), json.dumps(meta, indent=2, sort_keys=True) + "\n")


def find_config_dir(path: str | os.PathLike) -> str:
    """The nearest of ``path``, its parent and grandparent that holds ``config.json``."""
    path = os.path.abspath(os.fspath(path))
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
            return candidate
    raise CheckpointError(
        f"{path}: no {CONFIG_FILE} here or in the two directories above; is this a checkpoint "
        "written by deepseekmoe-convert or train.py?"
    )


def read_config(path: str | os.PathLike) -> DeepseekConfig:
    """The `DeepseekConfig` of a checkpoint directory (HF fields from config.json, options from the metadata)."""
    directory = find_config_dir(path)
    options = None
    meta_path = os.path.join(directory, METADATA_FILE)
    if os.path.isfile(meta_path):
        meta = read_json(meta_path, CheckpointError)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{meta_path}: expected a JSON object, found a {type(meta).__name__}")
        try:
            options = ModelOptions.from_dict(meta.get("options"))
        except ConfigError as e:
            raise CheckpointError(f"{meta_path}: {e}") from None
    try:
        return DeepseekConfig.from_hf(os.path.join(directory, CONFIG_FILE), options=options)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def param_tree(model: nnx.Module) -> dict:
    """The parameters as a nested dict of arrays (the layout of ``params/``)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_params(model: nnx.Module, directory: str | os.PathLike) -> None:
    """Save the model's parameters as an Orbax checkpoint at ``directory/params`` (written aside, then renamed)."""
    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(target):
        raise CheckpointError(f"{target} already exists")
    tmp = tempfile.mkdtemp(prefix=".params-", dir=directory)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), param_tree(model))
        ckptr.wait_until_finished()
        os.replace(os.path.join(tmp, PARAMS_DIR), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model: nnx.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a complete model directory (config files + params) atomically: built next to ``directory`` and
    renamed into place; an existing ``directory`` is only replaced with ``overwrite=True``, and only once the new
    one is complete.

    In a multi-process run every process must call this with the same ``directory`` on a filesystem they share:
    each writes the shards of the parameters it holds, and process 0 writes the config files and renames the
    finished directory into place. A failure in any process (outside Orbax's own collective write) is raised in
    every process, and the staging directory is removed. Staging directories of ``directory`` that a killed
    writer left behind (its process is gone) are removed first, with one line on stderr each.
    """
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if os.path.exists(directory) and not overwrite:
        raise CheckpointError(f"{directory} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(directory)
    multi_process = process_count() > 1
    primary = is_main_process()
    # Every process writes into the same staging directory, so in a multi-process run its name is fixed.
    shared_tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-saving")
    tmp = shared_tmp

    def stage(name: str, work) -> None:
        """Run ``work`` here, then agree across processes whether every process succeeded."""
        error = None
        try:
            work()
        except Exception as e:  # noqa: BLE001 (re-raised below, after the other processes have heard of it)
            error = e
        if multi_process:
            failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
            if error is None and failed.any():
                error = CheckpointError(
                    f"{directory}: saving failed in process(es) {np.flatnonzero(failed).tolist()} while {name}; "
                    "their logs have the error"
                )
        if error is not None:
            if primary:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error

    def make_tmp() -> None:
        nonlocal tmp
        if not primary:
            return
        os.makedirs(parent, exist_ok=True)
        for stale in remove_stale_staging(directory):
            print(f"removed {stale}: a staging directory of {directory} left by an interrupted save", file=sys.stderr)
        if multi_process:
            shutil.rmtree(shared_tmp, ignore_errors=True)
            os.makedirs(shared_tmp)
        else:
            tmp = make_staging_dir(directory)

    def write_params() -> None:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), param_tree(model))
        ckptr.wait_until_finished()

    def finish() -> None:
        if primary:
            write_config_files(tmp, model.config, {"param_dtype": model.config.options.param_dtype})
            publish_directory(tmp, directory)

    try:
        stage("creating the staging directory", make_tmp)
        stage("writing the parameters", write_params)
        stage("writing the config files and publishing", finish)
    except BaseException:
        if primary and not multi_process:
            shutil.rmtree(tmp, ignore_errors=True)  # also after Ctrl-C
        raise


def load_checkpoint(ckpt_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None):
    """A ready `DeepseekForCausalLM` from a model directory (or a training step directory).

    Args:
      ckpt_dir: directory holding ``params/`` (config files here or up to two levels above).
      mesh: restore each parameter directly sharded over this mesh (logical-axis rules of the config); default:
        this process's first device (in a multi-process run, each process then holds a full copy).
      dtype: parameter dtype to restore into (e.g. "bfloat16" for inference); default: the saved one.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(ckpt_dir)))
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(
            f"{path}: no {PARAMS_DIR}/ directory; expected a directory written by "
            "deepseekmoe-convert hf-to-jax or a train.py checkpoint step"
        )
    config = read_config(path)
    if dtype is not None:
        config = config.with_options(param_dtype=str(jnp.dtype(dtype)))
    graphdef, params_state, rest = nnx.split(abstract_model(config), nnx.Param, ...)
    reader = ParamsReader(params_dir)
    reader.check_matches(config, params_state)
    reader.check_complete()
    if mesh is not None:
        check_mesh_fits(config, mesh, abstract_params=params_state)
        shardings = param_shardings(params_state, rules_for(config), mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, params_state)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(params_state),
        nnx.to_pure_dict(shardings),
    )
    try:
        with quiet_missing_item_metadata():
            restored = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many types for damaged directories)
        detail = (str(e).splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            raise  # out of memory: not the checkpoint's fault (pass a mesh, or dtype="bfloat16")
        raise CheckpointError(
            f"{params_dir}: cannot restore the parameters ({detail}); the directory is incomplete or damaged, "
            "convert or copy it again"
        ) from None
    nnx.replace_by_pure_dict(params_state, restored)
    return nnx.merge(graphdef, params_state, rest)
