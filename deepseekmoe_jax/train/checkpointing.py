"""Training checkpoints with Orbax's `CheckpointManager`, checked for integrity when restored.

Layout of a run directory::

    RUN/
      config.json, deepseekmoe_jax.json      the model config (`write_config_files`)
      checkpoints/<step>/
        params/          the parameters as a pure dict (loadable alone by `deepseekmoe_jax.checkpoint.load_checkpoint`)
        opt_state/       the optax state
        train_state/     JSON: step, data position, RNG key data, tokens seen, seed, sequence length and a
                         checksum of every array of params/ and opt_state/
      damaged_checkpoints/<step>/   step directories that failed to restore, moved aside by a resume (kept, not
                                    deleted, and out of reach of the retention of checkpoints/)

Saves are asynchronous (device arrays are copied to host memory, then written by a background thread while
training continues); only the newest ``keep`` checkpoints are kept. A step directory appears under its final
name only once complete, so a run killed mid-save resumes from the previous one.

Integrity. Every array's checksum (`state_checksums`: two 32-bit hashes of its exact bit pattern, computed on
device in one jitted pass, independent of the sharding) is recorded in train_state at save and compared after
restore. A checkpoint whose files are missing, truncated or altered, whose metadata is unreadable, whose
train_state is not what this loop writes, or whose arrays do not match their checksums raises
`DamagedCheckpoint`; one that is intact but was written with other model or optimizer settings (its recorded tree
of shapes and dtypes differs from this run's) raises `CheckpointMismatch`. Both are `CheckpointError`s whose
one-line message starts with the step directory.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deepseekmoe_jax.checkpoint import CheckpointError
from deepseekmoe_jax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # next to CHECKPOINT_DIR: Orbax's manager never sees (or deletes) these
# What every training checkpoint's train_state holds (`RunCheckpointer.save` adds step, rng and checksums).
TRAIN_STATE_KEYS = ("step", "rng", "data_position", "seed", "seq_len")
CHECKSUMS_KEY = "checksums"
ARRAY_ITEMS = ("params", "opt_state")
_REASON_CHARS = 200  # how much of a storage error's own text a message quotes


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that cannot be read back intact: files missing, truncated or altered, unreadable metadata, a
    train_state that is not what this training loop writes, or an array that differs from its recorded checksum.
    ``step_dir`` names it and ``reason`` says what is wrong (the message is ``"<step_dir>: damaged checkpoint:
    <reason>"``)."""

    def __init__(self, step_dir: str, reason: str):
        super().__init__(f"{step_dir}: damaged checkpoint: {reason}")
        self.step_dir = step_dir
        self.reason = reason


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint whose parameters or optimizer state have another structure, shape or dtype than the
    run restoring it (its model or optimizer settings were changed)."""


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


# ----------------------------------------------------------------------------------------------- checksums
_U32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (wrap-around uint32 arithmetic): every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_hash(x) -> jax.Array:
    """Two uint32 hashes of the exact bit pattern of ``x`` (any shape, any sharding): ``sum(bits * (2i+1))`` and
    ``sum(fmix(bits ^ fmix(i + c)))`` mod 2^32 over the elements' bits and linear indices ``i``. Integer sums are
    associative, so the result is the same however the array is sharded; changing any one element always
    changes the first (its index multiplier is odd, hence invertible mod 2^32)."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8-byte values: a trailing pair
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride & _U32)
        stride *= bits.shape[dim]
    first = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum(_fmix32(bits ^ _fmix32(index + jnp.uint32(_GOLDEN))), dtype=jnp.uint32)
    return jnp.stack([first, second])


_HASHERS: dict = {}


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def state_checksums(items: dict[str, Any]) -> dict[str, list[int]]:
    """``{"params/model/...": [h1, h2], "opt_state/0/mu/...": ...}`` for the arrays of ``items`` (name -> pytree
    of `jax.Array`), computed on device in one jitted pass; collective in a multi-process run (every process
    calls it and gets the same values)."""
    flat = jax.tree_util.tree_flatten_with_path(items)[0]
    if not flat:
        return {}
    names = [_path_name(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, jax.sharding.NamedSharding)), None)
    out = None
    if mesh is not None:
        out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        devices = set(mesh.devices.flat)
        # A leaf placed elsewhere (e.g. a scalar on one device) joins the mesh, replicated, so one program runs.
        leaves = [x if x.sharding.device_set == devices else jax.device_put(x, out) for x in leaves]
    hasher = _HASHERS.get(mesh)
    if hasher is None:
        hasher = _HASHERS[mesh] = jax.jit(lambda xs: jnp.stack([_leaf_hash(x) for x in xs]), out_shardings=out)
    result = hasher(leaves)
    values = np.asarray(result if result.is_fully_addressable else result.addressable_data(0))
    return {name: [int(a), int(b)] for name, (a, b) in zip(names, values.tolist(), strict=True)}


# ----------------------------------------------------------------------------------------------- errors
_STATUS = re.compile(
    r"\b(NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|OUT_OF_RANGE|INVALID_ARGUMENT|PERMISSION_DENIED|UNAVAILABLE|"
    r"INTERNAL|UNKNOWN|ABORTED|RESOURCE_EXHAUSTED): "
)


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while error is not None and len(out) < 12 and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _one_line(text: str, limit: int = _REASON_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 4].rstrip() + " ..."


def summarize_storage_error(error: BaseException, step_dir: str) -> str:
    """One line from an Orbax/TensorStore exception (which can print whole TensorStore specs): the file or array
    it names, and its own reason."""
    texts = [f"{type(e).__name__}: {e}" for e in _chain(error)]
    best = next((t for t in reversed(texts) if _STATUS.search(t)), texts[-1])
    best = re.split(r"\s*\[tensorstore_spec|\s*See full TensorStore details", best)[0]
    files = re.findall(r'(?:local )?file "([^"]+)"', best)
    if not files:  # any path inside the step directory, in any of the chained messages
        pattern = re.escape(step_dir.rstrip(os.sep)) + r"/[^\s\"'\]\[,;()<>{}]*"
        files = [m for t in texts for m in re.findall(pattern, t)]
    array = re.search(r'Error (?:reading|writing) "([^"]+)"', best)
    status = _STATUS.search(best)
    reason = best
    if files and f'"{files[-1]}"' in best:
        reason = best.split(f'"{files[-1]}"', 1)[1].lstrip(":, ") or best
    elif status:
        reason = best[status.start() :]
    where = []
    if array:
        where.append(f"array chunk {array.group(1)!r}")
    if files:
        where.append(f"file {max(files, key=len)}")
    prefix = " in ".join(where)
    code = f"{status.group(1)}: " if status and status.group(1) not in reason else ""
    return (f"{prefix}: " if prefix else "") + _one_line(code + reason)


_PREVIOUS_UNRAISABLE_HOOK = None


def _drop_abandoned_orbax_reads() -> None:
    """Keep the tracebacks of abandoned Orbax reads off stderr for the rest of the process (installed once).

    A restore that fails on one array leaves the reads of the other arrays as coroutines that raise the same error
    when they are finalised, which happens only once the failure has been handled, often much later: each then
    prints "Exception ignored in: <coroutine ...>" with a traceback. The failure itself is reported in one line
    (`summarize_storage_error`); every other unraisable exception still goes to the previous hook, and asyncio's
    reports of other tasks are kept.
    """
    global _PREVIOUS_UNRAISABLE_HOOK
    if _PREVIOUS_UNRAISABLE_HOOK is not None:
        return
    previous = _PREVIOUS_UNRAISABLE_HOOK = sys.unraisablehook

    def hook(unraisable) -> None:
        obj = unraisable.object
        code = getattr(obj, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedOrbaxTasks())


# Step directories whose restore failed in this process: late reports of their abandoned reads are dropped.
_FAILED_RESTORES: set[str] = set()


class _AbandonedOrbaxTasks(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports of Orbax's abandoned reads: tasks and futures
    whose exception was raised in Orbax's code, or names a step directory whose restore already failed (TensorStore
    raises from native code, so its futures carry no Python frames)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" not in message:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{message} {exc}"
        if any(step_dir in text for step_dir in _FAILED_RESTORES):
            return False
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


@contextlib.contextmanager
def _quiet_failed_reads(settle_s: float = 0.3):
    """Hold back what Orbax's reader threads print while a restore runs; if it fails, drop it.

    When one read of a sharded restore fails, Orbax raises at once while the reads of the other shards are still
    in flight; they end later with tracebacks on stderr ("Exception ignored in: <coroutine ...>", "Event loop is
    closed") that repeat the error in hundreds of lines. The caller reports the failure in one line instead.
    After a success the held-back text is printed as it was.
    """
    held = io.StringIO()
    stderr, hook = sys.stderr, sys.unraisablehook
    sys.stderr = held
    sys.unraisablehook = lambda unraisable: None
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            gc.collect()  # finalise the abandoned reads now, while their output is still held
            time.sleep(settle_s)
            gc.collect()
        sys.stderr, sys.unraisablehook = stderr, hook
        if not failed and held.getvalue():
            stderr.write(held.getvalue())


# ----------------------------------------------------------------------------------------------- train_state
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_train_state(meta: Any, step_dir: str, step: int) -> dict[str, Any]:
    """``meta`` (a checkpoint's JSON train_state) if it is what `RunCheckpointer.save` writes; else
    `DamagedCheckpoint` naming the step directory and the first wrong key."""
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(step_dir, f"train_state is a {type(meta).__name__}, not a JSON object")
    missing = [k for k in TRAIN_STATE_KEYS if k not in meta]
    if missing:
        raise DamagedCheckpoint(
            step_dir,
            f"train_state lacks {missing} (has {sorted(meta)}); it was edited, or written by another version of "
            "the training loop (then use another train.run_dir, or fine-tune from its parameters with "
            "train.init_from)",
        )

    def bad(key: str, expected: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(step_dir, f"train_state {key!r} is {_one_line(repr(meta[key]), 60)}, {expected}")

    if not _is_int(meta["step"]) or meta["step"] != step:
        raise bad("step", f"expected the step number of its directory, {step}")
    rng = meta["rng"]
    if not (isinstance(rng, list) and len(rng) == 2 and all(_is_int(v) and 0 <= v <= _U32 for v in rng)):
        raise bad("rng", "expected two integers in [0, 2^32) (uint32 key data)")
    for key in ("data_position", "tokens_seen"):
        if key in meta and not (_is_int(meta[key]) and meta[key] >= 0):
            raise bad(key, "expected an integer >= 0")
    if not _is_int(meta["seed"]):
        raise bad("seed", "expected an integer")
    if not (_is_int(meta["seq_len"]) and meta["seq_len"] > 0):
        raise bad("seq_len", "expected an integer > 0")
    sums = meta.get(CHECKSUMS_KEY)
    if sums is not None and not (
        isinstance(sums, dict)
        and all(
            isinstance(v, list) and len(v) == 2 and all(_is_int(h) and 0 <= h <= _U32 for h in v) for v in sums.values()
        )
    ):
        raise DamagedCheckpoint(step_dir, f"train_state {CHECKSUMS_KEY!r} is not a map of array names to two uint32s")
    return meta


# ----------------------------------------------------------------------------------------------- checkpointer
class RunCheckpointer:
    """Save and restore `TrainState` plus host-side state (data position) in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        _drop_abandoned_orbax_reads()
        _serial_replicas_on_cpu(ocp)
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.directory = os.path.join(self.run_dir, CHECKPOINT_DIR)
        # Saves in progress when a run was killed stay behind as ``<step>.orbax-checkpoint-tmp-*`` directories (up to
        # a whole checkpoint each); the manager removes them when it starts, and `removed_partial_saves` names them.
        self.removed_partial_saves = (
            sorted(
                os.path.join(self.directory, name)
                for name in os.listdir(self.directory)
                if ".orbax-checkpoint-tmp" in name and os.path.isdir(os.path.join(self.directory, name))
            )
            if os.path.isdir(self.directory)
            else []
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, host_state: dict[str, Any]) -> bool:
        """Start saving ``state`` at its step (returns at once when asynchronous). False if that step exists.

        The checksums of params and opt_state are computed first (on device, one pass) and go into train_state.
        """
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        train_state = {
            "step": step,
            "rng": [int(x) for x in np.asarray(jax.device_get(state.rng)).reshape(-1)],
            **host_state,
            CHECKSUMS_KEY: state_checksums({"params": state.params, "opt_state": state.opt_state}),
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            train_state=ocp.args.JsonSave(train_state),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def read_train_state(self, step: int) -> dict[str, Any]:
        """The JSON ``train_state`` of step ``step`` (no arrays are read), validated; `DamagedCheckpoint` if it is
        missing, unreadable, lacks one of `TRAIN_STATE_KEYS` or holds values of the wrong type."""
        step_dir = self.step_dir(step)
        path = os.path.join(step_dir, "train_state", "metadata")
        if not os.path.isdir(os.path.join(step_dir, "train_state")):
            what = "is empty" if os.path.isdir(step_dir) and not os.listdir(step_dir) else "has no train_state/"
            raise DamagedCheckpoint(step_dir, f"the step directory {what} (an incomplete or stray directory)")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DamagedCheckpoint(step_dir, f"cannot read {path} ({_one_line(f'{type(e).__name__}: {e}')})") from e
        return validate_train_state(meta, step_dir, step)

    def check_structure(self, step: int, abstract: TrainState) -> None:
        """Compare the recorded tree of shapes and dtypes of params/ and opt_state/ with ``abstract``: unreadable
        metadata is `DamagedCheckpoint`, a difference `CheckpointMismatch` (no arrays are read)."""
        from etils import epath

        step_dir = self.step_dir(step)
        handler = ocp.StandardCheckpointHandler()
        for item in ARRAY_ITEMS:
            item_dir = os.path.join(step_dir, item)
            try:
                tree = handler.metadata(epath.Path(item_dir)).tree
                saved = {
                    _path_name(p): (tuple(m.shape), np.dtype(m.dtype))
                    for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]
                }
            except Exception as e:  # a missing, truncated or garbled _METADATA file, or storage it points to
                if isinstance(e, OSError | ValueError | KeyError | TypeError) and not _STATUS.search(str(e)):
                    meta_file = os.path.join(item_dir, "_METADATA")
                    reason = f"{meta_file} ({_one_line(f'{type(e).__name__}: {e}', 120)})"
                else:
                    reason = summarize_storage_error(e, step_dir)
                raise DamagedCheckpoint(step_dir, f"cannot read the metadata of {item}/: {reason}") from e
            want = {
                _path_name(p): (tuple(x.shape), np.dtype(x.dtype))
                for p, x in jax.tree_util.tree_flatten_with_path(getattr(abstract, item))[0]
            }
            if saved != want:
                only_saved = sorted(set(saved) - set(want))
                only_want = sorted(set(want) - set(saved))
                differ = sorted(k for k in set(saved) & set(want) if saved[k] != want[k])
                if differ:
                    k = differ[0]
                    detail = f"{item}/{k}: {saved[k][0]} {saved[k][1]} in the checkpoint, {want[k][0]} {want[k][1]} now"
                else:
                    parts = []
                    if only_saved:
                        parts.append(f"{len(only_saved)} array(s) only in the checkpoint, e.g. {item}/{only_saved[0]}")
                    if only_want:
                        parts.append(f"{len(only_want)} array(s) only in this run, e.g. {item}/{only_want[0]}")
                    detail = "; ".join(parts)
                raise CheckpointMismatch(
                    f"{step_dir}: cannot restore the parameters and optimizer state: they do not match this run's "
                    f"model or optimizer ({detail}). Settings such as train.grad_clip change the optimizer state's "
                    "structure: restore the settings the run was started with, or use another train.run_dir "
                    "(train.init_from fine-tunes from the checkpoint's parameters alone)"
                )

    def _agree(self, step: int, error: CheckpointError | None) -> CheckpointError | None:
        """In a multi-process run, make every process see a failure that some process met (a damaged chunk is
        read by the process owning that shard only), so that all skip or stop together instead of hanging."""
        if jax.process_count() == 1:
            return error
        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        if error is None and failed.any():
            error = DamagedCheckpoint(
                self.step_dir(step), f"unreadable in process(es) {np.flatnonzero(failed).tolist()} (see their output)"
            )
        return error

    def restore(
        self, step: int, abstract: TrainState, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restore step ``step`` onto the shardings of ``abstract`` (a `TrainState` of `jax.ShapeDtypeStruct`) and
        verify every array against the checksum recorded at save.

        Raises `CheckpointMismatch` when the saved state does not match ``abstract`` (e.g. after changing the model
        or optimizer settings) and `DamagedCheckpoint` when it cannot be read back intact; both name the step
        directory. ``check(train_state)`` runs before any array is read (e.g. to refuse other data settings).
        ``meta[CHECKSUMS_KEY]`` is None for a checkpoint saved without checksums (then unverified).
        """
        step_dir = self.step_dir(step)
        error = None
        try:
            meta = self.read_train_state(step)
            self.check_structure(step, abstract)
        except CheckpointError as e:
            error = e
        error = self._agree(step, error)
        if error is not None:
            raise error
        if check is not None:
            check(meta)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            opt_state=ocp.args.StandardRestore(abstract.opt_state),
        )
        out = None
        try:
            with _quiet_failed_reads():
                out = self.manager.restore(step, args=args)
        except MemoryError:
            raise
        except Exception as e:  # the tree matched, so this is a storage error: missing, truncated, garbled files
            _FAILED_RESTORES.add(os.path.abspath(step_dir))
            reason = summarize_storage_error(e, step_dir)
            error = DamagedCheckpoint(step_dir, f"cannot read the parameters and optimizer state: {reason}")
            error.__cause__ = e
        error = self._agree(step, error)
        if error is not None:
            raise error
        recorded = meta.get(CHECKSUMS_KEY)
        if recorded is not None:
            got = state_checksums({"params": out.params, "opt_state": out.opt_state})
            if set(got) != set(recorded):
                extra = sorted(set(recorded) ^ set(got))
                raise DamagedCheckpoint(
                    step_dir, f"train_state {CHECKSUMS_KEY!r} does not list the checkpoint's arrays (e.g. {extra[0]})"
                )
            wrong = [name for name in got if got[name] != recorded[name]]
            if wrong:
                more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
                raise DamagedCheckpoint(
                    step_dir, f"{wrong[0]}{more} differs from the checksum recorded when it was saved (altered data)"
                )
        rng = np.asarray(meta["rng"], np.uint32)
        state = TrainState(
            step=jax.device_put(np.int32(meta["step"]), abstract.step.sharding),
            params=out.params,
            opt_state=out.opt_state,
            rng=jax.device_put(rng, abstract.rng.sharding),
            bad_step=jax.device_put(np.int32(-1), abstract.bad_step.sharding),
        )
        return state, meta

    def move_aside(self, step: int) -> str:
        """Move the step directory ``step`` to ``RUN/damaged_checkpoints/<step>`` (``<step>.1``, ... if taken),
        where neither resume nor retention sees it; returns the new path. Call on one process only, then
        `reload` on every process."""
        target_root = os.path.join(self.run_dir, DAMAGED_DIR)
        os.makedirs(target_root, exist_ok=True)
        target = os.path.join(target_root, str(step))
        n = 0
        while os.path.lexists(target):
            n += 1
            target = os.path.join(target_root, f"{step}.{n}")
        os.rename(self.step_dir(step), target)
        return target

    def reload(self) -> None:
        """Re-read the list of steps from disk (after step directories were moved)."""
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
