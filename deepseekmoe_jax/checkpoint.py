"""JAX checkpoint directories: layout, config files, saving and loading parameters with Orbax.

A model directory (what ``deepseekmoe-convert hf-to-jax`` writes, and what every training checkpoint step holds)::

    DIR/
      config.json            the HF config (DeepseekConfig.to_hf())
      deepseekmoe_jax.json   project metadata: format version, ModelOptions, parameter dtype and count
      params/                an Orbax PyTree checkpoint of the model parameters: a nested dict shaped like
                             ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (scan-stacked layers)
      tokenizer.json ...     tokenizer files, when known

`read_config` also looks one and two levels up for the config files, so a training run directory
``RUN/config.json`` serves its step checkpoints ``RUN/checkpoints/<step>/params``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deepseekmoe_jax.config import ConfigError, DeepseekConfig, ModelOptions

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
METADATA_FILE = "deepseekmoe_jax.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent; the message names the path."""


def write_config_files(
    directory: str | os.PathLike, config: DeepseekConfig, extra: dict[str, Any] | None = None
) -> None:
    """Write ``config.json`` (HF) and ``deepseekmoe_jax.json`` (format version, options, ``extra``)."""
    directory = os.fspath(directory)
    config.save_hf(os.path.join(directory, CONFIG_FILE))
    meta = {"format_version": FORMAT_VERSION, "options": config.options.to_dict(), **(extra or {})}
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


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
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
        options = ModelOptions.from_dict(meta.get("options"))
    try:
        return DeepseekConfig.from_hf(os.path.join(directory, CONFIG_FILE), options=options)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def param_tree(model: nnx.Module) -> dict:
    """The parameters as a nested dict of arrays (the layout of ``params/``)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_params(model: nnx.Module, directory: str | os.PathLike) -> None:
    """Save the model's parameters as an Orbax checkpoint at ``directory/params`` (written aside, then renamed)."""
    import orbax.checkpoint as ocp

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
    renamed into place; an existing ``directory`` is only replaced with ``overwrite=True``."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise CheckpointError(f"{directory} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        write_config_files(tmp, model.config, {"param_dtype": model.config.options.param_dtype})
        save_params(model, tmp)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None):
    """A ready `DeepseekForCausalLM` from a model directory (or a training step directory).

    Args:
      path: directory holding ``params/`` (config files here or up to two levels above).
      mesh: restore each parameter directly sharded over this mesh (logical-axis rules of the config); default:
        the default device.
      dtype: parameter dtype to restore into (e.g. "bfloat16" for inference); default: the saved one.
    """
    import orbax.checkpoint as ocp

    from deepseekmoe_jax.model import DeepseekForCausalLM
    from deepseekmoe_jax.sharding import check_mesh_fits, param_shardings, rules_for

    path = os.path.abspath(os.fspath(path))
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(
            f"{path}: no {PARAMS_DIR}/ directory; expected a directory written by "
            "deepseekmoe-convert hf-to-jax or a train.py checkpoint step"
        )
    config = read_config(path)
    if dtype is not None:
        config = config.with_options(param_dtype=str(jnp.dtype(dtype)))
    abstract = nnx.eval_shape(lambda: DeepseekForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, params_state, rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is not None:
        check_mesh_fits(config, mesh)
        shardings = param_shardings(params_state, rules_for(config), mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, params_state)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(params_state),
        nnx.to_pure_dict(shardings),
    )
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters for this config ({e})") from None
    nnx.replace_by_pure_dict(params_state, restored)
    return nnx.merge(graphdef, params_state, rest)
