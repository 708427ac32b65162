"""Model directories: save/load with Orbax, restoring straight onto a different mesh (also from the converted
layout), training-step layouts, publishing safely, and errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import small_config
from flax import nnx
from test_convert_helpers import model_logits, random_model
from test_param_store import flat_params, write_converted

from deepseekmoe_jax.checkpoint import (
    PARAMS_DIR,
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
    save_params,
    write_config_files,
)
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.param_store import ParamsReader, leaf_path
from deepseekmoe_jax.partitioning import rules_for
from deepseekmoe_jax.sharding import make_mesh, param_shardings

CONFIG = small_config()
# Two MoE layers in one scanned segment: the smallest model whose sharded forward pass covers every layer kind
# that mesh axes touch (experts, heads, vocab); each compile on 8 fake devices costs seconds.
MESH_CONFIG = small_config(first_k_dense_replace=0, num_hidden_layers=2)


def expected_shardings(config, mesh) -> dict:
    state = nnx.state(abstract_model(config), nnx.Param)
    flat, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(param_shardings(state, rules_for(config), mesh)))
    return {leaf_path(tuple(getattr(k, "key", k) for k in keys)): v for keys, v in flat}


def test_restore_onto_other_meshes(tmp_path):
    """Saved from a model sharded over expert=4 x data=2; restored directly sharded over fsdp=2 x expert=2 x
    tensor=2 and onto a single device, with unchanged parameters and logits."""
    config = MESH_CONFIG
    mesh_a = make_mesh(data=2, expert=4)
    model = random_model(config, seed=0)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, rules_for(config), mesh_a)))
    assert model.model.segments[0].layers[0].mlp.experts.w_gate[...].sharding.spec[1] == "expert"
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 16))
    want = model_logits(model, ids, mesh=mesh_a)
    save_checkpoint(model, str(tmp_path / "ckpt"))
    saved = flat_params(model)

    mesh_b = make_mesh(fsdp=2, expert=2, tensor=2)
    restored = load_checkpoint(str(tmp_path / "ckpt"), mesh=mesh_b)
    shardings = expected_shardings(config, mesh_b)
    for path, value in flat_params(restored).items():
        assert value.sharding == shardings[path], path  # born on mesh_b, not resharded from one device
        np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[path]))
    w_gate = restored.model.segments[0].layers[0].mlp.experts.w_gate[...]
    assert w_gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    got_b = model_logits(restored, ids, mesh=mesh_b)
    np.testing.assert_allclose(got_b, want, rtol=0, atol=1e-5 * np.abs(want).max())

    single = load_checkpoint(str(tmp_path / "ckpt"))
    devices = {d for v in flat_params(single).values() for d in v.sharding.device_set}
    assert devices == {jax.devices()[0]}
    np.testing.assert_allclose(model_logits(single, ids), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_converted_layout_restores_onto_a_mesh(tmp_path):
    model = random_model(CONFIG, seed=2)
    write_converted(model, str(tmp_path / "conv"))
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    restored = load_checkpoint(str(tmp_path / "conv"), mesh=mesh)
    shardings = expected_shardings(CONFIG, mesh)
    original = flat_params(model)
    for path, value in flat_params(restored).items():
        assert value.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(original[path]))


def test_load_with_dtype(tmp_path):
    model = random_model(CONFIG, seed=4)
    save_checkpoint(model, str(tmp_path / "ckpt"))
    restored = load_checkpoint(ckpt_dir=str(tmp_path / "ckpt"), dtype="bfloat16")
    assert restored.config.options.param_dtype == "bfloat16"
    original = flat_params(model)
    for path, value in flat_params(restored).items():
        assert value.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(value), np.asarray(original[path]).astype(value.dtype))


def test_train_step_layout_finds_config(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "100"
    step.mkdir(parents=True)
    write_config_files(str(run), CONFIG)
    save_params(random_model(CONFIG, seed=6), str(step))
    assert read_config(str(step)) == CONFIG
    assert load_checkpoint(str(step)).config == CONFIG


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no params/ directory"):
        load_checkpoint(str(tmp_path))
    model = random_model(CONFIG, seed=7)
    save_checkpoint(model, str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(model, str(tmp_path / "ckpt"))
    save_checkpoint(model, str(tmp_path / "ckpt"), overwrite=True)
    other = CONFIG.replace(intermediate_size=64)
    other.save_hf(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match=r"mlp\.(down|gate|up)_proj has shape .* config.json implies"):
        load_checkpoint(str(tmp_path / "ckpt"))


def test_missing_chunk_is_reported_not_read_as_zeros(tmp_path):
    """A converted directory that lost one chunk file (a partial copy) still opens, and its array would read the
    missing chunk as zeros; loading and slice reading must both refuse, naming the array and the chunk."""
    model = random_model(CONFIG, seed=8)
    directory = str(tmp_path / "conv")
    write_converted(model, directory)
    name = "model.segments.1.layers.0.mlp.experts.w_up"
    array_dir = os.path.join(directory, PARAMS_DIR, name)
    chunks = sorted(f for f in os.listdir(array_dir) if not f.startswith("."))
    assert len(chunks) > 1
    lost = chunks[len(chunks) // 2]
    os.remove(os.path.join(array_dir, lost))
    with pytest.raises(CheckpointError, match=rf"{name} is missing its chunk file {lost}\b"):
        load_checkpoint(directory)
    reader = ParamsReader(directory)
    with pytest.raises(CheckpointError, match=rf"cannot read {name}.*missing"):
        reader.read(leaf_path(tuple(name.split("."))))
    # An intact sibling is unaffected.
    path = leaf_path(tuple("model.segments.1.layers.0.mlp.experts.w_down".split(".")))
    np.testing.assert_array_equal(reader.read(path), np.asarray(flat_params(model)[path]))


def test_save_checkpoint_publishes_safely(tmp_path, monkeypatch):
    """The published directory has ordinary permissions; an overwrite whose final rename fails leaves the old
    directory in place (and no staging directories)."""
    import deepseekmoe_jax.checkpoint as checkpoint_module

    target = tmp_path / "ckpt"
    save_checkpoint(random_model(CONFIG, seed=9), str(target))
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask
    before = sorted(p.name for p in target.rglob("*"))

    real_replace = os.replace

    def failing_replace(src, dst):
        if os.fspath(dst) == str(target) and ".tmp-" in os.fspath(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(random_model(CONFIG, seed=10), str(target), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in target.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    np.testing.assert_array_equal(  # still the first model
        np.asarray(flat_params(load_checkpoint(str(target)))[("model", "norm", "weight")]),
        np.asarray(flat_params(random_model(CONFIG, seed=9))[("model", "norm", "weight")]),
    )


def test_damaged_metadata_files_are_named(tmp_path):
    directory = tmp_path / "ckpt"
    save_checkpoint(random_model(CONFIG, seed=11), str(directory))
    meta = directory / "deepseekmoe_jax.json"
    original = meta.read_text()
    meta.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"deepseekmoe_jax\.json: expected a JSON object, found a list"):
        read_config(str(directory))
    meta.write_text(json.dumps({**json.loads(original), "options": {"no_such_option": 1}}))
    with pytest.raises(CheckpointError, match=r"deepseekmoe_jax\.json: .*no_such_option"):
        load_checkpoint(str(directory))
    meta.write_text(original)
    os.remove(directory / PARAMS_DIR / "_METADATA")
    for read in (ParamsReader, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"params: no _METADATA file"):
            read(str(directory))
