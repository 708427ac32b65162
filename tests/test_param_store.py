"""The params/ store: leaf specs, the streaming writer's layout (checked at 16B size without allocating), the slice
reader on both Orbax storage layouts, and the writer's refusal of untested orbax-checkpoint releases."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import small_config
from test_convert_helpers import random_model

from deepseekmoe_jax import DeepseekConfig, param_store
from deepseekmoe_jax.checkpoint import param_tree, save_checkpoint, write_config_files
from deepseekmoe_jax.param_store import (
    ORBAX_OLDEST,
    PARAMS_DIR,
    CheckpointError,
    ParamsReader,
    ParamsWriter,
    UnsupportedOrbaxError,
    check_orbax_version,
    leaf_path,
    leaf_specs,
)

CONFIG = small_config()


def flat_params(model) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(param_tree(model))
    return {leaf_path(tuple(getattr(k, "key", k) for k in keys)): v for keys, v in flat}


def write_converted(model, directory: str) -> None:
    """A converted-layout directory (per-leaf zarr arrays, chunked per layer/expert) written by ParamsWriter."""
    os.makedirs(directory)
    write_config_files(directory, model.config)
    writer = ParamsWriter(os.path.join(directory, PARAMS_DIR), model.config)
    for path, value in flat_params(model).items():
        writer.write(path, (), np.asarray(value))
    writer.close()


def test_reader_reads_both_orbax_layouts(tmp_path):
    model = random_model(CONFIG, seed=5)
    save_checkpoint(model, str(tmp_path / "ocdbt"))
    write_converted(model, str(tmp_path / "zarr"))
    a, b = ParamsReader(str(tmp_path / "ocdbt")), ParamsReader(str(tmp_path / "zarr"))
    assert a.use_ocdbt and not b.use_ocdbt
    path = ("model", "segments", "1", "layers", "0", "mlp", "experts", "w_down")
    want = np.asarray(flat_params(model)[path])
    for reader in (a, b):
        assert reader.shape(path) == want.shape
        np.testing.assert_array_equal(reader.read(path, (2, 5)), want[2, 5])
        np.testing.assert_array_equal(reader.read(path, (1,)), want[1])
        np.testing.assert_array_equal(reader.read(path), want)


def test_16b_writer_layout_without_allocating(tmp_path):
    """At full 16B size the writer's arrays hold one chunk per layer and per expert (every HF tensor fills whole
    chunks) and no chunk exceeds 16 MiB; only metadata is written, no data."""
    config = DeepseekConfig.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "deepseekmoe-16b.yaml"))
    config = config.with_options(param_dtype="bfloat16")
    params = str(tmp_path / "params")
    writer = ParamsWriter(params, config)
    specs = leaf_specs(config)
    assert sum(int(np.prod(s.shape)) for s in specs.values()) == 16_375_728_128
    for path, spec in specs.items():
        with open(os.path.join(params, ".".join(path), ".zarray")) as f:
            zarray = json.load(f)
        assert tuple(zarray["shape"]) == spec.shape and zarray["dtype"] == "bfloat16"
        chunks = zarray["chunks"]
        assert np.prod(chunks) * 2 <= 16 * 2**20, path
        for axis, size, chunk in zip(spec.axes, spec.shape, chunks, strict=True):
            assert chunk == (1 if axis in ("layers", "expert") else chunk) and chunk <= size
    experts = specs[("model", "segments", "1", "layers", "0", "mlp", "experts", "w_gate")]
    assert experts.shape == (27, 64, 2048, 1408)
    writer.abort()
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(params) for f in fs) < 10**6


def test_tested_orbax_releases():
    check_orbax_version()  # the installed release (an upgrade makes this fail first: test it, then list it)
    for version in (ORBAX_OLDEST, "0.11.99", "0.12.0", "0.12.8", "0.12.10.dev20260101"):
        check_orbax_version(version)
    for version in ("0.11.39", "0.10.3", "0.13.0", "0.13.0rc1", "1.0.0", "unknown"):
        with pytest.raises(UnsupportedOrbaxError, match=f"orbax-checkpoint {version} is installed"):
            check_orbax_version(version)


def test_writer_refuses_an_untested_orbax_release(tmp_path, monkeypatch):
    """With an orbax-checkpoint release it was not tested with, the writer raises before writing anything, naming
    the installed and the tested releases and the pin to install."""
    monkeypatch.setattr(param_store, "orbax_version", lambda: "0.13.1")
    params = tmp_path / "params"
    with pytest.raises(CheckpointError) as err:
        ParamsWriter(str(params), CONFIG)
    assert isinstance(err.value, UnsupportedOrbaxError)
    message = str(err.value)
    assert message.startswith("orbax-checkpoint 0.13.1 is installed, but the streaming checkpoint writer was tested")
    assert "orbax-checkpoint 0.11.40 to 0.12.x only" in message
    assert message.endswith("pip install 'orbax-checkpoint>=0.11.40,<0.13'")
    assert not params.exists()
