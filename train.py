"""``python train.py ARGS`` = ``deepseekmoe-train ARGS``: train a DeepSeekMoE model, or ``prepare`` token files.

    python train.py                                        # built-in demo: configs/tiny.yaml on Python's stdlib
    python train.py --config configs/X.yaml [--set train.steps=1000 ...]
    python train.py prepare --input FILES_OR_DIRS --output DIR --tokenizer bytes|tokenizer.json

The command line is `deepseekmoe_jax.cli.train`; this file only runs it under the name ``python train.py``.
"""

import sys


def main(argv=None) -> int:
    """`deepseekmoe_jax.cli.train.main` under the name ``python train.py``; returns the exit status."""
    try:  # importing the package loads JAX: a Ctrl-C meanwhile ends like one during set-up
        from deepseekmoe_jax.cli import train as cli
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return cli.main(argv, prog="python train.py")


if __name__ == "__main__":
    sys.exit(main())
