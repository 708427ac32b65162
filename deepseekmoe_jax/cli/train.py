"""``deepseekmoe-train`` (also ``python train.py`` in a checkout): train a DeepSeekMoE model, or prepare token files.

    deepseekmoe-train                                      # built-in demo: configs/tiny.yaml on Python's stdlib
    deepseekmoe-train --config configs/X.yaml [--set train.steps=1000 ...]
    deepseekmoe-train prepare --input FILES_OR_DIRS --output DIR --tokenizer bytes|tokenizer.json

All logic lives in `deepseekmoe_jax.train`; this module parses arguments, reports versions and devices, and maps
errors to exit codes (0 done, 2 bad input, 3 non-finite loss, 143 stopped by SIGTERM/SIGINT after saving, 130
interrupted by Ctrl-C before training started or during ``prepare``). A bad input is one line ``error: ...`` on
stderr naming the file, key or value and what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from deepseekmoe_jax.cli.args import Parser

# The repository's configs/ (a checkout or an editable install); elsewhere configs/tiny.yaml under the working
# directory.
_REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
DEFAULT_CONFIG = os.path.join(_REPO_CONFIG if os.path.isdir(_REPO_CONFIG) else "configs", "tiny.yaml")
DEFAULT_PROG = "deepseekmoe-train"
SAMPLE_PROMPT = "def "


def _train_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Train (or fine-tune) a DeepSeekMoE model. With no arguments: the built-in demo "
        "(configs/tiny.yaml on the Python standard library's source, byte-level tokens, CPU, a few minutes). "
        f"Subcommand: '{prog} prepare --help' makes token files.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="project config with model/options/train/data/mesh")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set train.steps=100 --set options.dtype=bfloat16",
    )
    p.add_argument("--run-dir", help="same as --set train.run_dir=DIR")
    p.add_argument("--steps", type=int, help="same as --set train.steps=N")
    p.add_argument(
        "--data",
        help="same as --set data.path=DIR --set data.corpus=null: train on a directory made by 'prepare' instead of "
        "the config's built-in corpus",
    )
    p.add_argument("--init-from", help="same as --set train.init_from=DIR: fine-tune a converted checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run even if the environment does not show one (JAX then detects the cluster, "
        "e.g. on Cloud TPU VM pods); launches through JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, "
        "SLURM, Open MPI or TPU pod variables are recognised without it",
    )
    return p


def _prepare_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"{prog} prepare",
        description="Tokenize text into a dataset directory: dataset.json + train.bin/val.bin (uint16 or uint32 "
        "token ids, documents separated by the eos id). Plain files are one document each; .jsonl files give one "
        "document per line.",
    )
    p.add_argument("--input", nargs="+", required=True, help="text files and/or directories (walked recursively)")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="'bytes' (byte-level: b -> b+3, pad 0, bos 1, eos 2) or a tokenizer.json path",
    )
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--pattern", default="*", help="file name pattern inside directories (default '*')")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl lines (default 'text')")
    p.add_argument("--eos-token", help="eos token of a tokenizer.json (default: found among common names)")
    p.add_argument("--bos-token", help="bos token of a tokenizer.json (default: found among common names)")
    p.add_argument("--add-bos", action="store_true", help="start every document with the bos token")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    p.add_argument("--no-progress", action="store_true")
    return p


def _versions() -> str:
    import flax
    import jax
    import optax
    import orbax.checkpoint

    import deepseekmoe_jax

    return (
        f"deepseekmoe-jax {deepseekmoe_jax.__version__} | python {sys.version.split()[0]} | jax {jax.__version__} | "
        f"flax {flax.__version__} | optax {optax.__version__} | orbax-checkpoint {orbax.checkpoint.__version__}"
    )


def _devices() -> str:
    import jax

    devs = jax.devices()
    return (
        f"devices: {len(devs)} x {devs[0].device_kind} ({jax.default_backend()}), "
        f"process {jax.process_index()} of {jax.process_count()}"
    )


def run_prepare(argv, prog: str = DEFAULT_PROG) -> int:
    """``prepare``: tokenize text files into a dataset directory (`deepseekmoe_jax.train.data.prepare`)."""
    args = _prepare_parser(prog).parse_args(argv)
    from deepseekmoe_jax.tokenizer import TokenizerError, tokenizer_from_arg
    from deepseekmoe_jax.train.data import DataError, prepare

    try:
        tok = tokenizer_from_arg(args.tokenizer, eos_token=args.eos_token, bos_token=args.bos_token)
        meta = prepare(
            args.input,
            args.output,
            tok,
            val_fraction=args.val_fraction,
            seed=args.seed,
            pattern=args.pattern,
            text_key=args.text_key,
            add_bos=args.add_bos,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"wrote {args.output}: train {tr['tokens']:,} tokens ({tr['documents']} documents), held-out "
        f"{va['tokens']:,} tokens ({va['documents']} documents), {meta['dtype']}, vocab {meta['vocab_size']}, "
        f"eos id {meta['eos_id']}"
    )
    return 0


def run_train(argv, prog: str = DEFAULT_PROG) -> int:
    """Train from a project config (`deepseekmoe_jax.train.train`); returns the exit status."""
    args = _train_parser(prog).parse_args(argv)
    from deepseekmoe_jax import distributed

    try:  # before any other JAX call; a no-op for a single process
        distributed.initialize(force=args.distributed)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from deepseekmoe_jax.config_files import parse_value
    from deepseekmoe_jax.param_store import CheckpointError
    from deepseekmoe_jax.partitioning import ShardingError
    from deepseekmoe_jax.tokenizer import TokenizerError
    from deepseekmoe_jax.train import EXIT_TERMINATED, DataError, NonFiniteLoss, TrainError, load_run_config, train
    from deepseekmoe_jax.train.loop import display_path
    from deepseekmoe_jax.validation import ConfigError

    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100", file=sys.stderr)
            return 2
        overrides[key.strip()] = parse_value(value)
    for key, value in (
        ("train.run_dir", args.run_dir),
        ("train.steps", args.steps),
        ("data.path", args.data),
        ("train.init_from", args.init_from),
    ):
        if value is not None:
            overrides[key] = value
    if args.data is not None:
        overrides.setdefault("data.corpus", None)  # --data replaces the config's built-in corpus

    say = print if distributed.is_main_process() else (lambda *_a, **_k: None)  # errors still print on every process
    say(_versions())
    say(_devices())
    try:
        run = load_run_config(args.config, overrides)
        say(f"config: {display_path(args.config)}" + (f" with {overrides}" if overrides else ""))
        result = train(run, progress=not args.no_progress)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, ShardingError, CheckpointError, TokenizerError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if result.checkpoint:
        ckpt = display_path(result.checkpoint)
        say(f"checkpoint: {ckpt}")
        say("sample from it:")
        say(
            f"  python -m deepseekmoe_jax.sample --checkpoint {shlex.quote(ckpt)} --prompt {shlex.quote(SAMPLE_PROMPT)}"
        )
    if result.status == "terminated":
        say(f"stopped at step {result.step}; run the same command again to resume")
        return EXIT_TERMINATED
    return 0


def main(argv=None, *, prog: str = DEFAULT_PROG) -> int:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit status. ``prog`` is the
    command's name in usage and help texts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "prepare":
            return run_prepare(argv[1:], prog)
        return run_train(argv, prog)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and returns 143 itself)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
