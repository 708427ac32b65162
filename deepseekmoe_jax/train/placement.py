"""A run on its devices: the mesh of the ``mesh:`` section, the layout of its batches, the checks of settings
against that mesh, and the training step compiled with the state layout's shardings (`compile_train_step`, the one
way a training step is compiled: by `train` and by the sharding parity tests)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding

from deepseekmoe_jax import sharding as sh
from deepseekmoe_jax.train.errors import TrainError
from deepseekmoe_jax.train.settings import MeshSettings, RunConfig
from deepseekmoe_jax.train.signals import StopVote, with_stop_vote
from deepseekmoe_jax.train.state import StateLayout
from deepseekmoe_jax.train.step import make_train_step


def build_mesh(settings: MeshSettings):
    """The device mesh of the ``mesh:`` section (over all devices of all processes)."""
    return sh.mesh_from_config(settings.as_dict())


def micro_batch_sharding(mesh, rules) -> NamedSharding:
    """Token windows [micro-batches, B, T+1]: B over the ``act_batch`` mesh axes, the rest unsharded."""
    return sh.batch_sharding(mesh, rules, leading=1, shard_length=False)


def check_settings(run: RunConfig, mesh, rules) -> None:
    """Sequence length vs the position limit, batch vs mesh; each failure a `TrainError` saying what to change."""
    s, c = run.train, run.model
    if s.seq_len > c.max_position_embeddings:
        raise TrainError(
            f"train.seq_len={s.seq_len} exceeds the model's max_position_embeddings="
            f"{c.max_position_embeddings}; lower train.seq_len"
        )
    shards = sh.batch_shards(mesh, rules)
    if s.micro_batch_size % shards:
        raise TrainError(
            f"the micro-batch of {s.micro_batch_size} sequences (train.batch_size={s.batch_size} / "
            f"train.grad_accum={s.grad_accum}) cannot be split over the {shards} batch shards of the mesh "
            f"{dict(mesh.shape)}; make it a multiple of {shards}"
        )


def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Use JAX's persistent compilation cache in ``directory`` (compilations over a second are stored, so a
    restarted or repeated run skips them). Takes effect even if this process has compiled before."""
    directory = os.path.abspath(os.fspath(directory))
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # the cache decides once per process whether it is on; ask again


def compile_train_step(
    run: RunConfig,
    layout: StateLayout,
    mesh,
    rules,
    *,
    vote: StopVote | None = None,
    compiler_options: Mapping[str, Any] | None = None,
):
    """The training step of ``run`` (`make_train_step` over ``layout``), compiled for ``mesh``.

    The state goes in and comes out with ``layout.shardings`` (its buffers donated), batches are token windows
    [train.grad_accum, train.micro_batch_size, train.seq_len + 1] with `micro_batch_sharding`, and the metrics
    come out replicated. The trace runs under ``use_mesh(mesh, rules)``. Returns the compiled executable:
    ``(state, batch) -> (state, metrics)``, or with ``vote`` (a multi-process run)
    ``(state, batch, vote.flags(...)) -> (state, metrics, any process asked to stop)``. ``compiler_options`` are
    XLA options for this compilation (the trainer passes none).
    """
    s = run.train
    micro_sh = micro_batch_sharding(mesh, rules)
    step_body = make_train_step(layout.build, layout.optimizer, layout.schedule, s.loss_chunk_size)
    batch_abstract = jax.ShapeDtypeStruct(
        (s.grad_accum, s.micro_batch_size, s.seq_len + 1), jnp.int32, sharding=micro_sh
    )
    extra_sh, out_sh, args = (), (layout.shardings, layout.replicated), ()
    if vote is not None:
        step_body = with_stop_vote(step_body)
        extra_sh, out_sh, args = (vote.sharding,), (*out_sh, layout.replicated), (vote.abstract,)
    step_fn = sh.jit_step(
        step_body,
        mesh,
        layout.shardings,
        rules=rules,
        batch_shardings=micro_sh,
        extra_in_shardings=extra_sh,
        out_shardings=out_sh,
        donate_state=True,
        compiler_options=compiler_options,
    )
    return step_fn.lower(layout.abstract, batch_abstract, *args).compile()
