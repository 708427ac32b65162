"""The training loop: set up mesh, data, model and optimizer; run, evaluate, log and checkpoint; resume.

`train` is what ``python train.py`` calls. It resumes from the newest intact checkpoint in ``train.run_dir`` when
there is one (exactly: parameters, optimizer state, step, data position and RNG come back, and the same compiled
step runs on the same batches), and stops on a non-finite loss naming the step while keeping the last good
checkpoint.

Reliability:

- Damaged checkpoints (missing, truncated or altered files, garbled metadata, a hand-edited train_state, an empty
  stray step directory, arrays that fail their checksums) are skipped with one line each and moved to
  ``RUN/damaged_checkpoints/`` once an older intact one has been restored, so that neither resume nor the
  retention of ``train.keep_checkpoints`` counts them. If every checkpoint is damaged the run refuses to start
  (it does not silently start afresh). A checkpoint written with other model/optimizer settings is not damage: it
  stops the run with the message to restore those settings.
- SIGTERM and a first SIGINT are handled for the whole of `train` (set-up, the loop, the final save and the final
  evaluation): during set-up the run exits as "terminated" (nothing new to save), during the loop it saves and
  exits, after the last step the final save and evaluation still complete. A second SIGINT raises
  KeyboardInterrupt. A rerun of a completed run whose final evaluation is missing from ``metrics.jsonl`` runs it.
- One process at a time: ``RUN/.lock`` is held (``flock``, by process 0 of a multi-process run) for the whole run;
  the kernel releases it when the holder ends, however it ends.
- An output directory that cannot be written is reported before anything is compiled.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import errno
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from deepseekmoe_jax import distributed
from deepseekmoe_jax import sharding as sh
from deepseekmoe_jax.checkpoint import CONFIG_FILE, CheckpointError, read_config, write_config_files
from deepseekmoe_jax.config import ConfigError
from deepseekmoe_jax.fs import write_text_atomically
from deepseekmoe_jax.model import DeepseekForCausalLM, moe_layer_indices, param_count
from deepseekmoe_jax.train import flops as flops_lib
from deepseekmoe_jax.train.checkpointing import (
    CHECKPOINT_DIR,
    CHECKSUMS_KEY,
    DAMAGED_DIR,
    DamagedCheckpoint,
    RunCheckpointer,
)
from deepseekmoe_jax.train.data import (
    DATASET_FILE,
    BatchSource,
    DataError,
    TokenDataset,
    global_batch,
    prepare,
    stdlib_sources,
)
from deepseekmoe_jax.train.metrics import JSONL_FILE, MetricsLogger, has_record
from deepseekmoe_jax.train.optim import decay_mask, make_optimizer, make_schedule
from deepseekmoe_jax.train.settings import MeshSettings, RunConfig, precision_warnings
from deepseekmoe_jax.train.step import ModelBuilder, TrainState, make_eval_step, make_train_step
from deepseekmoe_jax.train.tokenizer import ByteTokenizer

RUN_CONFIG_FILE = "run_config.yaml"
LOCK_FILE = ".lock"
EXIT_TERMINATED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on request


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


class NonFiniteLoss(TrainError):
    """The loss or gradient norm became NaN/inf at ``step``; ``checkpoint`` is the last good one (or None)."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class RunDirLocked(TrainError):
    """Another training process holds the run directory's lock; ``holder`` is what it wrote there."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did: ``status`` is "completed", "terminated" (signal) or "already_complete"."""

    status: str
    run_dir: str
    step: int
    checkpoint: str | None
    last_metrics: dict[str, Any]
    eval_metrics: dict[str, Any] | None


# ----------------------------------------------------------------------------------------------- mesh & batch
def build_mesh(settings: MeshSettings):
    """The device mesh of the ``mesh:`` section (over all devices of all processes)."""
    return sh.mesh_from_config(settings.as_dict())


def micro_batch_sharding(mesh, rules) -> NamedSharding:
    """Token windows [micro-batches, B, T+1]: B over the ``act_batch`` mesh axes, the rest unsharded."""
    return sh.batch_sharding(mesh, rules, leading=1, shard_length=False)


# ----------------------------------------------------------------------------------------------- setup helpers
def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Use JAX's persistent compilation cache in ``directory`` (compilations over a second are stored, so a
    restarted or repeated run skips them). Takes effect even if this process has compiled before."""
    from jax.experimental.compilation_cache import compilation_cache

    directory = os.path.abspath(os.fspath(directory))
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # the cache decides once per process whether it is on; ask again


def resolve_dataset(run: RunConfig, log: Callable[[str], None]) -> TokenDataset:
    """Open ``data.path``, or prepare the built-in corpus into ``<run_dir>/data`` on first use."""
    d = run.data
    if d.path is not None and d.corpus is not None:
        raise ConfigError("data.path and data.corpus are both set; choose one")
    if d.path is not None:
        return TokenDataset(d.path)
    if d.corpus is None:
        raise ConfigError(
            "no training data: set data.path to a directory made by `python train.py prepare ...` "
            "(or data.corpus=python-stdlib for the built-in demo corpus)"
        )
    target = os.path.join(run.train.run_dir, "data")
    # Process 0 prepares the corpus if it is missing; every process then meets at the same barrier, whatever it
    # found on disk, so that none starts reading before the files are complete and none waits alone.
    failure = None
    if distributed.is_main_process() and not os.path.isfile(os.path.join(target, DATASET_FILE)):
        try:
            files = stdlib_sources()
            log(
                f"preparing the built-in corpus: {len(files)} Python standard library files from "
                f"{os.path.dirname(files[0])} -> {display_path(target)} (byte-level tokenizer)"
            )
            prepare(files, target, ByteTokenizer(), val_fraction=d.val_fraction, progress=False)
        except Exception as e:  # raised after the barrier, so the other processes do not wait forever
            failure = e
    distributed.barrier("built-in corpus prepared")
    if failure is not None:
        raise failure
    if not os.path.isfile(os.path.join(target, DATASET_FILE)):
        raise DataError(
            f"{target}: no {DATASET_FILE}: process 0 could not prepare the built-in corpus (see its error), or "
            "train.run_dir is not on storage shared by all processes (set data.path to a dataset every host can "
            "read)"
        )
    return TokenDataset(target)


def display_path(path: str) -> str:
    """``path`` as printed to the user: relative to the working directory when it lies inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check_output_dir(run_dir: str) -> None:
    """Create ``run_dir`` if needed and make sure files can be written in it (and in its checkpoints/ and
    damaged_checkpoints/ if present): `TrainError` naming the path otherwise, before anything is compiled."""
    probe = run_dir
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise TrainError(f"train.run_dir={run_dir}: {probe} is a file, not a directory; choose another train.run_dir")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise TrainError(
            f"train.run_dir={run_dir}: cannot create it ({e.strerror or e}); choose a writable train.run_dir"
        ) from None
    for sub in ("", CHECKPOINT_DIR, DAMAGED_DIR):
        path = os.path.join(run_dir, sub) if sub else run_dir
        if os.path.lexists(path) and not os.path.isdir(path):
            raise TrainError(f"{path} is not a directory; move it away or choose another train.run_dir")
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            raise TrainError(f"{path} is not writable (permission denied); choose a writable train.run_dir")


class RunLock:
    """An exclusive lock on a run directory: ``flock`` on ``RUN/.lock``, which holds the holder's host, pid and
    start time as text. The kernel releases the lock when the holding process ends, however it ends, so a lock
    file left by a killed run does not block; the file itself is removed on `release`."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise TrainError(f"{self.path}: cannot create the run lock ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise TrainError(f"{self.path}: cannot lock the run directory ({e.strerror or e})") from None
                raise RunDirLocked(
                    f"{os.path.dirname(self.path)} is in use by another training process ({holder}); it is free "
                    "once that process ends: wait for it, stop it, or use another train.run_dir",
                    holder,
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock: lock anew
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        text = f"host {socket.gethostname()} pid {os.getpid()} since {started}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while still locked, so no other process holds a lock on this file
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 400, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown: it has not written its host and pid yet"


def _agree(error: BaseException | None, what: str) -> None:
    """Raise ``error`` on this process, or on every process if any of a multi-process run failed ``what``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        if error is None and failed.any():
            error = TrainError(f"{what} failed on process(es) {np.flatnonzero(failed).tolist()}; see their output")
    if error is not None:
        raise error


def check_run_dir(run: RunConfig, resuming: bool) -> None:
    """Refuse to resume a run directory that holds a different model (HF fields): its checkpoints hold parameters
    of another shape, and overwriting its config would lose it."""
    run_dir = run.train.run_dir
    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(cfg_path):
        old = read_config(run_dir).to_hf(metadata=False)
        new = run.model.to_hf(metadata=False)
        diff = sorted(k for k in new if old.get(k) != new[k])
        if diff and resuming:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
            raise TrainError(
                f"{run_dir} holds checkpoints of a different model ({details}); use another train.run_dir "
                "or restore the original model settings to resume"
            )


def write_run_dir(run: RunConfig, dataset: TokenDataset) -> None:
    """Write the model config, the full run config and the tokenizer into the run directory (process 0), once
    the run has been checked and its state restored, so that a refused resume leaves the directory as it was."""
    run_dir = run.train.run_dir
    # Every process has read the old config before process 0 replaces it.
    distributed.barrier("run directory checked")
    if not distributed.is_main_process():
        return
    os.makedirs(run_dir, exist_ok=True)
    extra = {
        "param_dtype": run.model.options.param_dtype,
        "tokenizer": dataset.tokenizer,
        "dataset": dataset.directory,
    }
    write_config_files(run_dir, run.model, extra)
    raw = dict(run.raw)
    raw["model"] = run.model.to_hf()
    raw["options"] = run.model.options.to_dict()
    raw["train"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(run.train).items()}
    raw["data"] = dataclasses.asdict(run.data)
    raw["mesh"] = run.mesh.as_dict()
    write_text_atomically(os.path.join(run_dir, RUN_CONFIG_FILE), yaml.safe_dump(raw, sort_keys=False))
    src = os.path.join(dataset.directory, "tokenizer.json")
    if dataset.tokenizer.get("type") == "huggingface" and os.path.isfile(src):
        shutil.copyfile(src, os.path.join(run_dir, "tokenizer.json"))


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


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGTERM and a first SIGINT into a stop request (``event.is_set()``); a second SIGINT aborts."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {}

    def handler(signum, frame):
        if signum == signal.SIGINT and event.is_set():
            raise KeyboardInterrupt
        event.signum = signum
        event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class StopVote:
    """The stop decision of a multi-process run, taken by all processes together.

    A signal may reach only some processes, or reach them between different steps. If one process stopped on its
    own, it would start the collective checkpoint save while the others ran the next step, and the run would hang.
    So each process's stop request rides into the compiled step as its share of a small int32 array [devices]
    (`flags`), the step returns its maximum as a replicated scalar (no extra collective program), and `agreed`
    reads that result for the step before the one just dispatched: every process sees the same value after the
    same step, and one step stays in flight meanwhile. A request is acted on one or two steps after it arrives.
    """

    def __init__(self, mesh):
        self.size = mesh.size
        self.sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        self.abstract = jax.ShapeDtypeStruct((self.size,), jnp.int32, sharding=self.sharding)
        self._recent: collections.deque = collections.deque(maxlen=2)
        # The only two arrays a process ever passes, built once: a step then costs no host-to-device copy.
        self._flags = tuple(self._build_flags(value) for value in (0, 1))

    def _build_flags(self, value: int) -> jax.Array:
        return jax.make_array_from_callback(
            (self.size,), self.sharding, lambda index: np.full(len(range(self.size)[index[0]]), value, np.int32)
        )

    def flags(self, requested: bool) -> jax.Array:
        """This process's request on each of its devices, as a global int32 array [devices]."""
        return self._flags[int(bool(requested))]

    def record(self, any_requested: jax.Array) -> None:
        """Keep the step's output (a replicated scalar, still being computed)."""
        self._recent.append(any_requested)

    def agreed(self) -> bool:
        """Whether any process had asked to stop by the step before the last one dispatched."""
        return len(self._recent) == 2 and bool(self._recent[0])


def with_stop_vote(step_fn: Callable) -> Callable:
    """``step_fn(state, batch) -> (state, metrics)`` extended with the `StopVote` flags:
    ``(state, batch, flags [devices]) -> (state, metrics, max(flags))``."""

    def step(state, batch, flags):
        state, metrics = step_fn(state, batch)
        return state, metrics, jnp.max(flags)

    return step


def _fmt_record(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}", f"lm {r['lm_loss']:.4f}", f"aux {r['aux_loss']:.4f}"]
    parts += [f"gnorm {r['grad_norm']:.3f}", f"lr {r['learning_rate']:.2e}", f"{r['tokens_per_second']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if "dropped_fraction" in r:
        parts.append(f"dropped {100 * float(np.mean(r['dropped_fraction'])):.1f}%")
        parts.append(f"imbalance {float(np.max(r['load_imbalance'])):.2f}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------- state layout
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


def plan_state(run: RunConfig, mesh, rules) -> StateLayout:
    """Parameter shardings from the logical-axis rules, optimizer-state shardings from XLA's propagation through a
    compiled ``optimizer.init``; nothing is allocated."""
    abstract_model = nnx.eval_shape(lambda: DeepseekForCausalLM(run.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_params_state, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TrainError("the model holds non-parameter state, which this training loop does not carry")
    param_sh = nnx.to_pure_dict(sh.param_shardings(abstract_params_state, rules, mesh))
    abstract_params = _abstract(nnx.to_pure_dict(abstract_params_state), param_sh)
    optimizer = make_optimizer(run.train, decay_mask(abstract_params_state))
    replicated = sh.replicated(mesh)
    with sh.use_mesh(mesh, rules):
        init_opt = jax.jit(optimizer.init).lower(abstract_params).compile()
    opt_sh = init_opt.output_shardings
    abstract_opt = _abstract(jax.eval_shape(optimizer.init, abstract_params), opt_sh)
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
        from deepseekmoe_jax.checkpoint import load_checkpoint

        say(f"initialising from {s.init_from}")
        model = load_checkpoint(s.init_from, mesh=mesh, dtype=config.options.param_dtype)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))
    model = sh.create_sharded_model(config, mesh, seed=s.seed, rules=rules)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


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
    params = initial_params(run, mesh, rules, say)
    put = lambda x: jax.device_put(x, layout.replicated)
    state = TrainState(
        step=put(np.int32(0)),
        params=params,
        opt_state=layout.init_opt(params),
        rng=put(np.asarray(jax.random.key_data(jax.random.key(run.train.seed)))),
        bad_step=put(np.int32(-1)),
    )
    return state, 0


def data_sources(run: RunConfig, say) -> tuple[TokenDataset, BatchSource, BatchSource | None]:
    """The dataset checked against the model, the shuffled training source and the held-out source (or None)."""
    s, config = run.train, run.model
    dataset = resolve_dataset(run, say)
    for w in dataset.check_model(config.vocab_size, config.eos_token_id):
        say(f"warning: {w}")
    train_split = dataset.split("train")
    train_src = BatchSource(train_split, s.seq_len, s.seed, shuffle=True, vocab_size=config.vocab_size)
    if train_src.num_windows < s.batch_size:
        raise DataError(
            f"{train_split.path}: {train_split.num_tokens:,} tokens give only {train_src.num_windows} sequences "
            f"of {s.seq_len} tokens, fewer than one batch of train.batch_size={s.batch_size}; add data or lower "
            "train.batch_size / train.seq_len"
        )
    eval_src = None
    if s.eval_every >= 0:
        val = dataset.splits.get("val")
        if val is not None and val.num_windows(s.seq_len) > 0:
            eval_src = BatchSource(val, s.seq_len, s.seed, shuffle=False, vocab_size=config.vocab_size)
        else:
            say(
                f"warning: no held-out sequences of {s.seq_len + 1} tokens in {dataset.directory} "
                "(val split empty or too short); evaluation is off"
            )
    say(
        f"data: {display_path(dataset.directory)}: train {train_split.num_tokens:,} tokens "
        f"({train_split.documents} documents, "
        f"{train_src.num_windows:,} sequences of {s.seq_len})"
        + (f", held-out {eval_src.split.num_tokens:,} tokens" if eval_src else "")
    )
    return dataset, train_src, eval_src


# ----------------------------------------------------------------------------------------------- train
def train(run: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) the training described by ``run``; see the module docstring.

    Raises `TrainError` (bad settings, `NonFiniteLoss`, `RunDirLocked`), `ConfigError`, `DataError`,
    `ShardingError` or `CheckpointError` with a message naming what to fix, and KeyboardInterrupt on a second
    SIGINT. Returns a `TrainResult`.
    """
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, run_dir=os.path.abspath(run.train.run_dir)))
    # The stop handler covers everything, set-up and the final save and evaluation included.
    with _stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        return _train(run, stop, cleanup, progress=progress, log=log)


def _signal_name(stop) -> str:
    return signal.Signals(getattr(stop, "signum", signal.SIGTERM)).name


def _train(run: RunConfig, stop, cleanup: contextlib.ExitStack, *, progress: bool, log) -> TrainResult:
    s, config, run_dir = run.train, run.model, run.train.run_dir
    is_main = distributed.is_main_process()
    multi_process = jax.process_count() > 1
    say = log if is_main else (lambda _msg: None)
    if s.compilation_cache:
        enable_compilation_cache(s.compilation_cache)
    for w in precision_warnings(run):
        say(f"warning: {w}")

    mesh = build_mesh(run.mesh)
    sh.check_mesh_fits(config, mesh)
    rules = sh.rules_for(config)
    micro_sh = micro_batch_sharding(mesh, rules)  # [A, B, T+1]
    check_settings(run, mesh, rules)

    # The run directory: writable, and ours alone (process 0 holds the lock for all processes).
    failure = None
    try:
        check_output_dir(run_dir)
        if is_main:
            lock = RunLock(run_dir)
            lock.acquire()
            cleanup.callback(lock.release)
    except TrainError as e:
        failure = e
    _agree(failure, f"preparing the run directory {run_dir}")

    def stopped_during_setup(where: str, step: int = 0, checkpoint: str | None = None) -> TrainResult | None:
        """A stop request before training starts ends the run here; nothing new exists to be saved. (A
        multi-process run carries the request into the loop, where all processes stop together.)"""
        if multi_process or not stop.is_set():
            return None
        say(f"{_signal_name(stop)} received during set-up ({where}): exiting before training (nothing new to save)")
        return TrainResult("terminated", run_dir, step, checkpoint, {}, None)

    dataset, train_src, eval_src = data_sources(run, say)
    if (result := stopped_during_setup("data")) is not None:
        return result

    checkpointer = RunCheckpointer(run_dir, keep=s.keep_checkpoints, async_save=s.async_checkpointing)
    cleanup.callback(checkpointer.close)
    check_run_dir(run, resuming=bool(checkpointer.all_steps()))  # before anything in the run directory is rewritten
    layout = plan_state(run, mesh, rules)
    with sh.use_mesh(mesh, rules):
        state, position = start_state(run, layout, checkpointer, mesh, rules, say)
    write_run_dir(run, dataset)
    start_step = int(state.step)
    latest = checkpointer.latest_step()
    restored = checkpointer.step_dir(latest) if latest is not None else None
    if (result := stopped_during_setup("state restored", start_step, restored)) is not None:
        return result

    fpt = flops_lib.training_flops_per_token(config, s.seq_len)
    device_kind = jax.devices()[0].device_kind
    peak, peak_source = flops_lib.peak_flops(device_kind, config.options.dtype, s.peak_flops)
    say(
        f"model: {config.num_hidden_layers} layers ({len(moe_layer_indices(config))} MoE), hidden "
        f"{config.hidden_size}, {param_count(layout.abstract.params):,} parameters, "
        f"{flops_lib.activated_params(config)['total']:,} activated matmul parameters per token, "
        f"{fpt / 1e6:,.1f} MFLOP per training token"
    )
    say(f"mesh: {dict(mesh.shape)} over {mesh.size} {device_kind} device(s), {jax.process_count()} process(es)")
    if peak is None:
        say(f"MFU: not reported ({peak_source})")
    say(
        f"run: {display_path(run_dir)} | steps {s.steps} | batch {s.batch_size} x {s.seq_len} tokens"
        f"{f' in {s.grad_accum} micro-batches' if s.grad_accum > 1 else ''} | lr {s.learning_rate:g} "
        f"({s.schedule}, warmup {s.warmup_steps})"
    )
    complete = start_step >= s.steps
    final_eval_missing = (
        complete and eval_src is not None and not has_record(os.path.join(run_dir, JSONL_FILE), start_step, "eval_loss")
    )
    if complete and not final_eval_missing:
        say(f"run already complete: step {start_step} >= train.steps={s.steps}")
        return TrainResult("already_complete", run_dir, start_step, restored, {}, None)

    shape = (s.grad_accum, s.micro_batch_size)
    # One process decides alone when to stop; several agree through the step itself (see StopVote).
    vote = StopVote(mesh) if multi_process else None
    with sh.use_mesh(mesh, rules):
        compiled_step = None
        if not complete:
            step_body = make_train_step(layout.build, layout.optimizer, layout.schedule, s.loss_chunk_size)
            batch_abstract = jax.ShapeDtypeStruct((*shape, s.seq_len + 1), jnp.int32, sharding=micro_sh)
            in_sh, out_sh, args = (layout.shardings, micro_sh), (layout.shardings, layout.replicated), ()
            if vote is not None:
                step_body = with_stop_vote(step_body)
                in_sh, out_sh, args = (*in_sh, vote.sharding), (*out_sh, layout.replicated), (vote.abstract,)
            step_fn = jax.jit(step_body, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=0)
            t0 = time.perf_counter()
            say("compiling the training step ...")
            compiled_step = step_fn.lower(layout.abstract, batch_abstract, *args).compile()
            say(f"compiled in {time.perf_counter() - t0:.1f} s")
        eval_fn = None
        if eval_src is not None:
            eval_fn = jax.jit(
                make_eval_step(layout.build, s.loss_chunk_size),
                in_shardings=(layout.shardings.params, micro_sh),
                out_shardings=layout.replicated,
            )
    if not complete and (result := stopped_during_setup("compiled", start_step, restored)) is not None:
        return result

    logger = MetricsLogger(
        run_dir,
        total_steps=s.steps,
        start_step=start_step,
        tensorboard=s.tensorboard,
        enabled=is_main,
        progress=progress,
    )
    cleanup.callback(logger.close)
    for note in logger.notes:
        say(note)

    def evaluate(params, step) -> dict[str, Any]:
        n_batches = min(s.eval_batches, math.ceil(eval_src.num_windows / s.micro_batch_size))
        nll = count = 0.0
        with sh.use_mesh(mesh, rules):
            for i in range(n_batches):
                tokens = global_batch(eval_src, i * s.micro_batch_size, (1, s.micro_batch_size), micro_sh)
                a, b = eval_fn(params, tokens)
                nll, count = nll + float(a), count + float(b)
        loss = nll / count
        rec = {"step": step, "eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 700.0)))}
        logger.write(rec)
        logger.message(f"eval   step {step:>6} | loss {loss:.4f} | perplexity {rec['eval_perplexity']:.2f}")
        return rec

    if complete:  # killed during (or before) its final evaluation: do that now, from the final checkpoint
        logger.message(
            f"run already complete: step {start_step} >= train.steps={s.steps}, but its final evaluation is missing "
            f"from {display_path(logger.jsonl_path)}: evaluating"
        )
        eval_record = evaluate(state.params, start_step)
        return TrainResult("already_complete", run_dir, start_step, restored, {}, eval_record)

    def check_finite(step_now: int, bad: int | None = None) -> None:
        """Raise `NonFiniteLoss` if a step went bad; ``bad`` is ``state.bad_step`` when already on the host."""
        bad = int(state.bad_step) if bad is None else int(bad)
        if bad >= 0:
            last = checkpointer.latest_step()
            where = checkpointer.step_dir(last) if last is not None else None
            raise NonFiniteLoss(
                f"the loss or gradient norm became NaN/inf at step {bad} (detected by step {step_now}); "
                "training stopped without saving. "
                + (f"The last good checkpoint is {where}. " if where else "No checkpoint was written yet. ")
                + "Lower train.learning_rate, check the data, or use float32 compute (options.dtype).",
                bad,
                where,
            )

    def save(step_now: int) -> None:
        check_finite(step_now)
        host_state = {
            "data_position": position,
            "tokens_seen": position * s.seq_len,
            "seed": s.seed,
            "seq_len": s.seq_len,
        }
        checkpointer.save(state, host_state)

    last_record: dict[str, Any] = {}
    eval_record = None
    status = "completed"
    step = start_step
    t_mark, step_mark = time.perf_counter(), step
    while step < s.steps:
        if stop.is_set() if vote is None else vote.agreed():
            status = "terminated"
            if stop.is_set():
                reason = f"{_signal_name(stop)} received"
            else:
                reason = "another process received a stop signal"
            logger.message(f"{reason}: saving a checkpoint at step {step} before exiting")
            break
        batch = global_batch(train_src, position, shape, micro_sh)
        if vote is None:
            state, metrics = compiled_step(state, batch)
        else:
            state, metrics, any_stop = compiled_step(state, batch, vote.flags(stop.is_set()))
            vote.record(any_stop)
        position += s.batch_size
        step += 1
        logger.advance(1)
        if step % s.log_every == 0 or step == s.steps:
            # One transfer (one wait for the step) for both the finiteness flag and the metrics.
            bad, host_metrics = jax.device_get((state.bad_step, metrics))
            check_finite(step, bad)
            now = time.perf_counter()
            tps = (step - step_mark) * s.batch_size * s.seq_len / max(now - t_mark, 1e-9)
            t_mark, step_mark = now, step
            rec = {"step": step}
            for k, v in host_metrics.items():
                rec[k] = np.asarray(v).tolist() if np.ndim(v) else float(v)
            rec.update(
                tokens_per_second=tps,
                mfu=flops_lib.mfu(fpt, tps, mesh.size, peak),
                tokens_seen=position * s.seq_len,
            )
            logger.write(rec)
            logger.message(_fmt_record(rec))
            logger.advance(0, loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}")
            last_record = rec
        if eval_fn is not None and s.eval_every > 0 and step % s.eval_every == 0 and step < s.steps:
            check_finite(step)
            eval_record = evaluate(state.params, step)
            t_mark, step_mark = time.perf_counter(), step
        if step % s.checkpoint_every == 0 or step == s.steps:
            save(step)
    if status == "terminated" or step == s.steps:
        save(step)
    if status == "completed" and eval_fn is not None:
        eval_record = evaluate(state.params, step)
    checkpointer.wait()  # the final checkpoint is on disk before this returns, whatever arrives meanwhile
    if status == "completed" and stop.is_set():
        logger.message(
            f"{_signal_name(stop)} received after the last step: the final checkpoint and evaluation were completed"
        )
    final = checkpointer.latest_step()
    return TrainResult(
        status, run_dir, step, checkpointer.step_dir(final) if final is not None else None, last_record, eval_record
    )
