"""The train state of a run: how it is laid out on the mesh (`StateLayout`, `plan_state`), a fresh one
(`initial_params`, `fresh_state`), and the one a run starts from (`start_state`: the newest intact checkpoint).

Damaged checkpoints (missing, truncated or altered files, garbled metadata, a hand-edited train_state, an empty
stray step directory, arrays that fail their checksums) are skipped with one line each and moved to
``RUN/damaged_checkpoints/`` once an older intact one has been restored, so that neither resume nor the retention
of ``train.keep_checkpoints`` counts them. If every checkpoint is damaged the run refuses to start (it does not
silently start afresh). A checkpoint written with other model/optimizer settings is not damage: it stops the run
with the message to restore those settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from deepseekmoe_jax import distributed
from deepseekmoe_jax import sharding as sh
from deepseekmoe_jax.checkpoint import CheckpointError, load_checkpoint
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.partitioning import use_mesh
from deepseekmoe_jax.train.checkpointing import CHECKSUMS_KEY, DAMAGED_DIR, DamagedCheckpoint, RunCheckpointer
from deepseekmoe_jax.train.errors import TrainError
from deepseekmoe_jax.train.optim import decay_mask, make_optimizer, make_schedule
from deepseekmoe_jax.train.run_dir import display_path
from deepseekmoe_jax.train.settings import RunConfig
from deepseekmoe_jax.train.step import ModelBuilder, TrainState


@dataclasses.dataclass
class StateLayout:
    """How the train state of a config is built, sharded and stepped on a mesh."""

    build: ModelBuilder
    optimizer: Any
    schedule: Callable
    init_opt: Any  # compiled optimizer.init
    shardings: TrainState  # of NamedSharding
    abstract: TrainState  # of jax.ShapeDtypeStruct with shardings
    replicated: NamedSharding


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def plan_state(run: RunConfig, mesh, rules) -> StateLayout:
    """Parameter shardings from the logical-axis rules; the optimizer state's parameter-shaped trees sharded like
    the parameters, its scalars replicated; nothing is allocated."""
    graphdef, abstract_params_state, rest = nnx.split(abstract_model(run.model), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TrainError("the model holds non-parameter state, which this training loop does not carry")
    param_sh = nnx.to_pure_dict(sh.param_shardings(abstract_params_state, rules, mesh))
    abstract_params = _abstract(nnx.to_pure_dict(abstract_params_state), param_sh)
    optimizer = make_optimizer(run.train, decay_mask(abstract_params_state))
    replicated = sh.replicated(mesh)
    opt_shapes = jax.eval_shape(optimizer.init, abstract_params)
    # Every copy of the parameter tree in the optimizer state (AdamW's moments) is laid out like the parameters;
    # the rest (step counts) is replicated. XLA's own propagation through ``init`` would replicate the moments, as
    # zeros do not follow their input's sharding.
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, opt_shapes, param_sh, transform_non_params=lambda _: replicated
    )
    with use_mesh(mesh, rules):
        init_opt = jax.jit(optimizer.init, out_shardings=opt_sh).lower(abstract_params).compile()
    abstract_opt = _abstract(opt_shapes, opt_sh)
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    return StateLayout(
        build=ModelBuilder(graphdef, abstract_params_state),
        optimizer=optimizer,
        schedule=make_schedule(run.train),
        init_opt=init_opt,
        shardings=TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated, bad_step=replicated),
        abstract=TrainState(
            step=scalar(jnp.int32),
            params=abstract_params,
            opt_state=abstract_opt,
            rng=scalar(jnp.uint32, (2,)),
            bad_step=scalar(jnp.int32),
        ),
        replicated=replicated,
    )


def initial_params(run: RunConfig, mesh, rules, say) -> dict:
    """Fresh parameters born sharded (seed ``train.seed``), or those of ``train.init_from`` for fine-tuning."""
    config, s = run.model, run.train
    if s.init_from is not None:
        say(f"initialising from {s.init_from}")
        model = load_checkpoint(s.init_from, mesh=mesh, dtype=config.options.param_dtype)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))
    model = sh.create_sharded_model(config, mesh, seed=s.seed, rules=rules)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def fresh_state(layout: StateLayout, params: dict, seed: int) -> TrainState:
    """The state at step 0: ``params`` (laid out as ``layout.shardings.params``), the optimizer's initial state,
    the RNG of ``seed`` and no bad step."""
    put = lambda x: jax.device_put(x, layout.replicated)
    return TrainState(
        step=put(np.int32(0)),
        params=params,
        opt_state=layout.init_opt(params),
        rng=put(np.asarray(jax.random.key_data(jax.random.key(seed)))),
        bad_step=put(np.int32(-1)),
    )


def check_resume(run: RunConfig, train_state: dict[str, Any], step_dir: str) -> None:
    """Refuse to resume the checkpoint in ``step_dir`` (its JSON ``train_state``) with another ``train.seed`` or
    ``train.seq_len``: its data position counts sequences of the order those two define, so either change would
    silently feed other data than the run was trained on (and a different seq_len another number of tokens)."""
    changed = [
        (f"train.{key}", train_state[key], getattr(run.train, key))
        for key in ("seed", "seq_len")
        if train_state[key] != getattr(run.train, key)
    ]
    if changed:
        details = ", ".join(f"{name}: {old!r} in the checkpoint, {new!r} now" for name, old, new in changed)
        raise TrainError(
            f"cannot resume from {step_dir}: {details}. The data order and position depend on them; restore the "
            "original values to resume, or start a new train.run_dir (with train.init_from to keep the parameters)"
        )


def start_state(run, layout: StateLayout, checkpointer: RunCheckpointer, mesh, rules, say) -> tuple[TrainState, int]:
    """The newest intact checkpoint of the run directory if there is one, else a fresh state; and the data
    position.

    Damaged checkpoints newer than the one restored are moved to ``RUN/damaged_checkpoints/`` with one line
    each. A checkpoint of other settings (`CheckpointMismatch`, or `check_resume`'s `TrainError`) stops the
    search: older ones were written with the same settings. If there are checkpoints and all are damaged,
    `CheckpointError` (nothing is moved).
    """
    damaged: list[DamagedCheckpoint] = []
    for step in reversed(checkpointer.all_steps()):
        step_dir = checkpointer.step_dir(step)
        try:
            state, host = checkpointer.restore(
                step, layout.abstract, check=lambda meta, where=step_dir: check_resume(run, meta, where)
            )
        except DamagedCheckpoint as e:
            damaged.append(e)
            continue
        say(f"resuming from {step_dir}")
        if host.get(CHECKSUMS_KEY) is None:
            say(f"note: {display_path(step_dir)} records no checksums (saved by an older version); not verified")
        moved = []
        if distributed.is_main_process():
            moved = [checkpointer.move_aside(int(os.path.basename(e.step_dir))) for e in damaged]
        distributed.barrier("damaged checkpoints moved aside")
        if damaged:
            checkpointer.reload()
        for e, target in zip(damaged, moved, strict=False):
            where, moved_to = display_path(e.step_dir), display_path(target)
            say(f"skipped damaged checkpoint {where}: {e.reason}; moved it to {moved_to}")
        return state, int(host["data_position"])
    if damaged:
        newest = damaged[0]
        others = [os.path.basename(e.step_dir) for e in damaged[1:]]
        raise CheckpointError(
            f"every checkpoint in {checkpointer.directory} is damaged, so there is nothing to resume from: "
            f"{newest}" + (f"; steps {', '.join(others)} are damaged too" if others else "") + ". Move the step "
            f"directories out of {checkpointer.directory} (e.g. into {os.path.join(run.train.run_dir, DAMAGED_DIR)})"
            " to start this run afresh, or use another train.run_dir"
        )
    return fresh_state(layout, initial_params(run, mesh, rules, say), run.train.seed), 0
