"""Training checkpoints with Orbax's `CheckpointManager`.

Layout of a run directory::

    RUN/
      config.json, deepseekmoe_jax.json      the model config (`write_config_files`)
      checkpoints/<step>/
        params/          the parameters as a pure dict (loadable alone by `deepseekmoe_jax.checkpoint.load_checkpoint`)
        opt_state/       the optax state
        train_state/     JSON: step, data position, RNG key data, tokens seen, seed and sequence length

Saves are asynchronous (device arrays are copied to host memory, then written by a background thread while
training continues); only the newest ``keep`` checkpoints are kept. A step directory appears under its final
name only once complete, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from deepseekmoe_jax.checkpoint import CheckpointError
from deepseekmoe_jax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"
# What every training checkpoint's train_state holds (`RunCheckpointer.save` adds step and rng to the host state).
TRAIN_STATE_KEYS = ("step", "rng", "data_position", "seed", "seq_len")
_MAX_CAUSE_CHARS = 600  # Orbax errors can print whole trees; enough of one to see what did not match


_SERIAL_REPLICAS = False


def _serial_replicas_on_cpu(ocp) -> None:
    """On the CPU backend, save each replicated array from one replica.

    Orbax's default "replica-parallel" saving has every replica of a replicated array write a slice of it, which
    on CPU costs a freshly compiled slicing op per array and save (seconds per checkpoint for a small model on
    several host devices) and buys nothing, as all replicas share the host's memory and disk.
    """
    global _SERIAL_REPLICAS
    if jax.default_backend() == "cpu" and not _SERIAL_REPLICAS:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # Orbax warns that it replaces the default handler, as intended
        try:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        finally:
            absl_logger.setLevel(level)
        _SERIAL_REPLICAS = True


class RunCheckpointer:
    """Save and restore `TrainState` plus host-side state (data position) in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        _serial_replicas_on_cpu(ocp)
        self.directory = os.path.join(os.path.abspath(os.fspath(run_dir)), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, host_state: dict[str, Any]) -> bool:
        """Start saving ``state`` at its step (returns at once when asynchronous). False if that step exists."""
        ocp = self._ocp
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        train_state = {
            "step": step,
            "rng": [int(x) for x in np.asarray(jax.device_get(state.rng)).reshape(-1)],
            **host_state,
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            train_state=ocp.args.JsonSave(train_state),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def _unreadable(self, step: int, what: str, error: BaseException, hint: str) -> CheckpointError:
        cause = f"{type(error).__name__}: {error}"
        if len(cause) > _MAX_CAUSE_CHARS:
            cause = cause[:_MAX_CAUSE_CHARS] + " ..."
        return CheckpointError(f"{self.step_dir(step)}: cannot restore the {what} ({cause}); {hint}")

    def read_train_state(self, step: int) -> dict[str, Any]:
        """The JSON ``train_state`` of step ``step`` (no arrays are read); `CheckpointError` if it is unreadable or
        lacks one of `TRAIN_STATE_KEYS`."""
        ocp = self._ocp
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(train_state=ocp.args.JsonRestore()))
            meta = dict(out.train_state)
        except Exception as e:  # Orbax raises many types for a damaged or foreign directory
            raise self._unreadable(
                step, "train_state", e, "the checkpoint is damaged or was not written by this training loop"
            ) from e
        missing = [k for k in TRAIN_STATE_KEYS if k not in meta]
        if missing:
            raise CheckpointError(
                f"{self.step_dir(step)}: train_state lacks {missing} (has {sorted(meta)}); the checkpoint was not "
                "written by this version of the training loop: use another train.run_dir, or fine-tune from its "
                "parameters with train.init_from"
            )
        return meta

    def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restore step ``step`` onto the shardings of ``abstract`` (a `TrainState` of `jax.ShapeDtypeStruct`).

        Raises `CheckpointError` naming the step directory when the saved state does not match ``abstract``
        (e.g. after changing the model or optimizer settings) or its train_state is incomplete.
        """
        ocp = self._ocp
        meta = self.read_train_state(step)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            opt_state=ocp.args.StandardRestore(abstract.opt_state),
        )
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # a tree or shape mismatch surfaces as ValueError, KeyError, TypeError, ...
            raise self._unreadable(
                step,
                "parameters and optimizer state",
                e,
                "they do not match this run's model or optimizer (settings such as train.grad_clip change the "
                "optimizer state's structure): restore the settings the run was started with, or use another "
                "train.run_dir (train.init_from fine-tunes from the checkpoint's parameters alone)",
            ) from e
        rng = np.asarray(meta["rng"], np.uint32)
        state = TrainState(
            step=jax.device_put(np.int32(meta["step"]), abstract.step.sharding),
            params=out.params,
            opt_state=out.opt_state,
            rng=jax.device_put(rng, abstract.rng.sharding),
            bad_step=jax.device_put(np.int32(-1), abstract.bad_step.sharding),
        )
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
