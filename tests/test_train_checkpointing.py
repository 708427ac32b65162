"""Training checkpoints: what the train_state records, and the errors of a checkpoint that cannot be resumed."""

import jax
import numpy as np
import optax
import pytest

from deepseekmoe_jax.sharding import make_mesh, replicated
from deepseekmoe_jax.train import TrainError, run_config_from_dict
from deepseekmoe_jax.train.checkpointing import CheckpointMismatch, DamagedCheckpoint, RunCheckpointer, state_checksums
from deepseekmoe_jax.train.state import check_resume
from deepseekmoe_jax.train.step import TrainState

HOST = {"data_position": 24, "tokens_seen": 24 * 16, "seed": 3, "seq_len": 16}


def _state(optimizer, mesh):
    rep = replicated(mesh)
    params = {"w": jax.device_put(np.arange(8, dtype=np.float32).reshape(2, 4), rep)}
    return TrainState(
        step=jax.device_put(np.int32(5), rep),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.device_put(np.array([7, 9], np.uint32), rep),
        bad_step=jax.device_put(np.int32(-1), rep),
    )


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def saved(tmp_path):
    mesh = make_mesh(data=8)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = _state(optimizer, mesh)
    ckpt = RunCheckpointer(tmp_path / "run", async_save=False)
    assert ckpt.save(state, HOST)
    ckpt.close()
    return tmp_path / "run", mesh, state


def test_train_state_round_trip(saved):
    run_dir, mesh, state = saved
    ckpt = RunCheckpointer(run_dir)
    meta = ckpt.read_train_state(5)
    sums = meta.pop("checksums")
    assert meta == {"step": 5, "rng": [7, 9], **HOST}
    assert sums == state_checksums({"params": state.params, "opt_state": state.opt_state})
    assert "params/w" in sums and all(len(v) == 2 for v in sums.values())
    restored, meta = ckpt.restore(5, _abstract(state))
    ckpt.close()
    assert meta["seq_len"] == 16 and meta["seed"] == 3
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(state.params["w"]))
    np.testing.assert_array_equal(np.asarray(restored.rng), [7, 9])
    assert int(restored.step) == 5


def test_an_optimizer_of_another_structure_is_a_clear_error(saved):
    run_dir, mesh, _ = saved
    unclipped = _state(optax.adamw(1e-3), mesh)  # what train.grad_clip=0 builds: no clipping state in the chain
    ckpt = RunCheckpointer(run_dir)
    step_dir = ckpt.step_dir(5)
    with pytest.raises(CheckpointMismatch, match=rf"^{step_dir}: cannot restore the parameters and optimizer state"):
        ckpt.restore(5, _abstract(unclipped))
    ckpt.close()


def test_a_train_state_without_a_required_key_is_a_clear_error(tmp_path):
    mesh = make_mesh(data=8)
    state = _state(optax.adamw(1e-3), mesh)
    ckpt = RunCheckpointer(tmp_path / "run", async_save=False)
    ckpt.save(state, {"data_position": 24, "seed": 3})  # as written before seq_len was recorded
    with pytest.raises(DamagedCheckpoint, match=r"checkpoints/5: damaged checkpoint: train_state lacks \['seq_len'\]"):
        ckpt.restore(5, _abstract(state))
    ckpt.close()


def test_resuming_with_another_seed_or_sequence_length_is_refused():
    meta = {"step": 5, "rng": [7, 9], **HOST}
    run = run_config_from_dict({"model": {}, "train": {"seed": 3, "seq_len": 16}})
    check_resume(run, meta, "RUN/checkpoints/5")  # the same settings: accepted
    other = run.replace_train(seed=4, seq_len=32)
    message = r"RUN/checkpoints/5: train\.seed: 3 in the checkpoint, 4 now, train\.seq_len: 16 in the checkpoint, 32"
    with pytest.raises(TrainError, match=message):
        check_resume(other, meta, "RUN/checkpoints/5")
    with pytest.raises(TrainError, match=r"train\.seq_len: 16 in the checkpoint, 8 now\. The data order"):
        check_resume(run.replace_train(seq_len=8), meta, "RUN/checkpoints/5")
