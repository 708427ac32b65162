"""``python -m convert ARGS`` = ``deepseekmoe-convert ARGS`` (`deepseekmoe_jax.cli.convert.main`)."""

import sys

from deepseekmoe_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
