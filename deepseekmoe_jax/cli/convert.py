"""``deepseekmoe-convert`` (also ``python -m convert``): parses arguments and calls `deepseekmoe_jax.convert`."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from deepseekmoe_jax.cli.args import Parser, non_negative_float, positive_int
from deepseekmoe_jax.convert.common import DTYPE_CHOICES, ConvertError, log
from deepseekmoe_jax.hf_io import DEFAULT_MAX_SHARD_BYTES

EPILOG = textwrap.dedent(
    """\
    examples:
      # deepseek-moe-16b-base (7 safetensors shards, 32.75 GB bf16) -> JAX, on a 24 GB machine
      deepseekmoe-convert hf-to-jax ~/models/deepseek-moe-16b-base ~/models/deepseek-moe-16b-base-jax
      deepseekmoe-convert inspect ~/models/deepseek-moe-16b-base-jax
      deepseekmoe-convert verify ~/models/deepseek-moe-16b-base ~/models/deepseek-moe-16b-base-jax --num-layers 2
      # a training checkpoint back to PyTorch / transformers
      deepseekmoe-convert jax-to-hf runs/my-run/checkpoints/20000 ~/models/my-finetune-hf

    exit status: 0 success, 1 verify found a parity mismatch, 2 bad input (the message says what to fix).
    """
)


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="deepseekmoe-convert",
        description="Convert DeepSeekMoE v1 checkpoints (deepseek-moe-16b-base/-chat and fine-tunes) between "
        "Hugging Face / PyTorch and JAX (Orbax), streaming: peak memory does not grow with the model "
        "(about 0.5 GB for deepseek-moe-16b).",
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=28),
    )
    sub = p.add_subparsers(dest="command", required=True, title="commands")

    h = sub.add_parser(
        "hf-to-jax",
        help="HF checkpoint directory -> JAX model directory",
        description="Convert a HF checkpoint directory (config.json + model.safetensors[.index.json] or "
        "pytorch_model.bin[.index.json]) into a JAX model directory: config.json, deepseekmoe_jax.json, an "
        "Orbax params/ checkpoint (layers stacked for scan) and the tokenizer files. Every tensor is checked "
        "against config.json before anything is written; the output appears only when complete.",
        epilog=textwrap.dedent(
            """\
            examples:
              deepseekmoe-convert hf-to-jax ~/models/deepseek-moe-16b-chat ~/models/deepseek-moe-16b-chat-jax
              deepseekmoe-convert hf-to-jax ./my-finetune ./my-finetune-jax --dtype float32 --overwrite
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    h.add_argument("hf_dir", metavar="HF_DIR", help="HF checkpoint directory")
    h.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist unless --overwrite)")
    h.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="parameter dtype to store (default: the checkpoint's torch_dtype, else bfloat16)",
    )
    h.add_argument(
        "--compute-dtype",
        choices=DTYPE_CHOICES,
        help="activation dtype recorded in the model options (default: same as --dtype)",
    )
    h.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (after success)")
    h.add_argument(
        "--refuse-nonfinite",
        action="store_true",
        help="stop with an error at the first tensor holding NaN/inf values (default: convert them, with a warning "
        "naming each tensor)",
    )
    h.add_argument("--no-progress", action="store_true", help="no progress bar")

    j = sub.add_parser(
        "jax-to-hf",
        help="JAX model directory or training step -> HF checkpoint",
        description="Write a JAX model directory (hf-to-jax output) or a training checkpoint step (a directory "
        "holding params/, config.json up to two levels above) as a HF checkpoint: per-expert keys, torch "
        "[out, in] weights, safetensors shards with model.safetensors.index.json, config.json "
        '(model_type "deepseek") and the tokenizer files. Loadable by transformers-style loaders and by '
        "deepseekmoe_jax.reference.",
        epilog=textwrap.dedent(
            """\
            examples:
              deepseekmoe-convert jax-to-hf ~/models/deepseek-moe-16b-base-jax ~/models/roundtrip-hf
              deepseekmoe-convert jax-to-hf runs/sft/checkpoints/8000 ./sft-hf --dtype bfloat16
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    j.add_argument("ckpt_dir", metavar="CKPT_DIR", help="JAX model directory or training checkpoint step")
    j.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist unless --overwrite)")
    j.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype of the written tensors (default: as stored)")
    j.add_argument(
        "--max-shard-size",
        help=f"largest safetensors shard, e.g. 500MB or 2GiB (default {DEFAULT_MAX_SHARD_BYTES // 10**9}GB)",
    )
    j.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (after success)")
    j.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser(
        "inspect",
        help="summarise a checkpoint directory",
        description="Print the config, parameter count, dtype and per-layer layout (dense/MoE, shapes) of a JAX "
        "model directory, a training checkpoint step or a HF checkpoint. Reads metadata only, and checks that the "
        "weights match config.json.",
        epilog="example:\n  deepseekmoe-convert inspect ~/models/deepseek-moe-16b-base-jax\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("dir", metavar="DIR")

    v = sub.add_parser(
        "verify",
        help="compare a converted model's logits with the PyTorch reference",
        description="Load HF_DIR into the PyTorch reference (transformers' Llama layers + DeepseekV2Moe, needs "
        "torch and transformers) and JAX_DIR into the JAX model, run random token batches through both in "
        "float32 and report max |logit difference| relative to max |logit|. Exits 1 above --tolerance. "
        "--num-layers N checks the embedding, the first N layers, the final norm and the head, so that a 16B "
        "checkpoint fits in memory (16B: about 6 GB for N=1 plus 5.5 GB per further layer).",
        epilog="example:\n  deepseekmoe-convert verify ~/models/deepseek-moe-16b-base "
        "~/models/deepseek-moe-16b-base-jax --num-layers 2\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("hf_dir", metavar="HF_DIR", help="the original HF checkpoint")
    v.add_argument("jax_dir", metavar="JAX_DIR", help="the converted JAX model directory (or a training step)")
    v.add_argument("--num-layers", type=int, help="check only the first N layers (default: all)")
    v.add_argument("--batches", type=positive_int, default=3, help="number of random batches (default 3)")
    v.add_argument("--batch-size", type=positive_int, default=2, help="sequences per batch (default 2)")
    v.add_argument("--seq-len", type=positive_int, default=32, help="tokens per sequence (default 32)")
    v.add_argument(
        "--tolerance", type=non_negative_float, default=1e-4, help="max allowed relative difference (default 1e-4)"
    )
    v.add_argument("--seed", type=int, default=0)
    return p


def _quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 verify mismatch, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    _quiet_libraries()

    from deepseekmoe_jax.hf_io import HFCheckpointError, parse_size
    from deepseekmoe_jax.hf_weights import WeightError
    from deepseekmoe_jax.param_store import CheckpointError
    from deepseekmoe_jax.partitioning import ShardingError
    from deepseekmoe_jax.validation import ConfigError

    user_errors = (ConvertError, CheckpointError, ConfigError, HFCheckpointError, WeightError, ShardingError)
    try:
        if args.command == "inspect":
            from deepseekmoe_jax.convert.describe import describe

            print(describe(args.dir))
            return 0

        from deepseekmoe_jax.convert.common import limit_heap_growth, versions_line

        limit_heap_growth()
        log(versions_line())
        if args.command == "hf-to-jax":
            from deepseekmoe_jax.convert.hf_to_jax import convert_hf_to_jax

            convert_hf_to_jax(
                args.hf_dir,
                args.out_dir,
                dtype=args.dtype,
                compute_dtype=args.compute_dtype,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                refuse_nonfinite=args.refuse_nonfinite,
            )
        elif args.command == "jax-to-hf":
            from deepseekmoe_jax.convert.jax_to_hf import convert_jax_to_hf

            try:
                max_bytes = DEFAULT_MAX_SHARD_BYTES if args.max_shard_size is None else parse_size(args.max_shard_size)
            except ValueError as e:
                raise ConvertError(f"--max-shard-size: {e}") from None
            convert_jax_to_hf(
                args.ckpt_dir,
                args.out_dir,
                dtype=args.dtype,
                max_shard_bytes=max_bytes,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        elif args.command == "verify":
            from deepseekmoe_jax.convert.verify import verify_parity

            result = verify_parity(
                args.hf_dir,
                args.jax_dir,
                num_layers=args.num_layers,
                batches=args.batches,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                tolerance=args.tolerance,
                seed=args.seed,
            )
            verdict = "PASS" if result.ok else "FAIL"
            for problem in result.problems:
                print(f"FAIL: {problem}")
            print(
                f"{verdict}: max |diff| / max |logit| = {result.max_rel:.3e} (tolerance {result.tolerance:g}), "
                f"max |diff| = {result.max_abs:.3e}, top-1 agreement {result.top1:.2%}, "
                f"{result.num_layers} layer(s)"
            )
            return 0 if result.ok else 1
        return 0
    except user_errors as e:
        log(f"error: {e}")
        return 2
    except OSError as e:  # disk full, permissions: the environment, not a bug
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("interrupted; no output was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
