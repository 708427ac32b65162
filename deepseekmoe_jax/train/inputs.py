"""The data of a run: the dataset of the ``data:`` section (the built-in corpus prepared on first use), checked
against the model, and the shuffled training and held-out batch sources."""

from __future__ import annotations

import os
from collections.abc import Callable

from deepseekmoe_jax import distributed
from deepseekmoe_jax.config import ConfigError
from deepseekmoe_jax.tokenizer import ByteTokenizer
from deepseekmoe_jax.train.data import DATASET_FILE, BatchSource, DataError, TokenDataset, prepare, stdlib_sources
from deepseekmoe_jax.train.run_dir import display_path
from deepseekmoe_jax.train.settings import RunConfig


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
