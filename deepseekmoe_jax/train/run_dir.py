"""The run directory: checks that it can be written, its exclusive lock, checks of what an existing one holds,
and the config files written into it.

- An output directory that cannot be written is reported before anything is compiled (`check_output_dir`).
- One process at a time: ``RUN/.lock`` is held (``flock``, by process 0 of a multi-process run) for the whole run;
  the kernel releases it when the holder ends, however it ends (`RunLock`).
- A run whose set-up fails (a bad dataset, a refused resume, a stop request) before anything else was written
  into the run directory leaves the file system as it was: the lock file and the directories `claim_run_dir`
  created are removed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import os
import shutil
import socket

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from deepseekmoe_jax import distributed
from deepseekmoe_jax.checkpoint import CONFIG_FILE, read_config, write_config_files
from deepseekmoe_jax.config import differing_fields, format_changes
from deepseekmoe_jax.fs import write_text_atomically
from deepseekmoe_jax.train.checkpointing import CHECKPOINT_DIR, DAMAGED_DIR
from deepseekmoe_jax.train.data import TokenDataset
from deepseekmoe_jax.train.errors import TrainError
from deepseekmoe_jax.train.settings import RunConfig

RUN_CONFIG_FILE = "run_config.yaml"
LOCK_FILE = ".lock"


class RunDirLocked(TrainError):
    """Another training process holds the run directory's lock; ``holder`` is what it wrote there."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


def display_path(path: str) -> str:
    """``path`` as printed to the user: relative to the working directory when it lies inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check_output_dir(run_dir: str) -> list[str]:
    """Create ``run_dir`` if needed and make sure files can be written in it (and in its checkpoints/ and
    damaged_checkpoints/ if present): `TrainError` naming the path otherwise, before anything is compiled.

    Returns the directories it created, outermost first (for `remove_created`); on an error it has removed them.
    """
    probe = run_dir
    missing = []
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        missing.append(probe)
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise TrainError(f"train.run_dir={run_dir}: {probe} is a file, not a directory; choose another train.run_dir")
    created = missing[::-1]
    try:
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
    except TrainError:
        remove_created(created)
        raise
    return created


def remove_created(created: list[str]) -> None:
    """Remove the directories of ``created`` (outermost first) that are empty, innermost first; stops at the first
    one that is not (something else was written into it, or another process uses it)."""
    for path in reversed(created):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            continue
        except OSError:
            return


class RunLock:
    """An exclusive lock on a run directory: ``flock`` on ``RUN/.lock``, which holds the holder's host, pid and
    start time as text. The kernel releases the lock when the holding process ends, however it ends, so a lock
    file left by a killed run does not block; the file itself is removed on `release`."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl  # POSIX only

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
        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        if error is None and failed.any():
            error = TrainError(f"{what} failed on process(es) {np.flatnonzero(failed).tolist()}; see their output")
    if error is not None:
        raise error


def claim_run_dir(run_dir: str, cleanup: contextlib.ExitStack) -> None:
    """Make ``run_dir`` writable (`check_output_dir`) and ours alone: process 0 takes the `RunLock` for all
    processes and holds it until ``cleanup`` closes. Closing ``cleanup`` then releases the lock and removes the
    directories made here if they are empty again, so a run that fails during set-up leaves no empty run
    directory behind. Any process's failure is raised on every process."""
    failure = None
    try:
        created = check_output_dir(run_dir)
        if distributed.is_main_process():
            cleanup.callback(remove_created, created)  # registered first: runs after the lock's release
            lock = RunLock(run_dir)
            lock.acquire()
            cleanup.callback(lock.release)
    except TrainError as e:
        failure = e
    _agree(failure, f"preparing the run directory {run_dir}")


def check_run_dir(run: RunConfig, resuming: bool) -> None:
    """Refuse to resume a run directory that holds a different model (HF fields): its checkpoints hold parameters
    of another shape, and overwriting its config would lose it."""
    run_dir = run.train.run_dir
    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(cfg_path):
        old = read_config(run_dir).to_hf(metadata=False)
        new = run.model.to_hf(metadata=False)
        diff = differing_fields(old, new)
        if diff and resuming:
            raise TrainError(
                f"{run_dir} holds checkpoints of a different model ({format_changes(diff)}); use another train.run_dir "
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
