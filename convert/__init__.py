"""``python -m convert``: the converter's command line, run from a checkout (the same as ``deepseekmoe-convert``).

Nothing lives here: the command line is `deepseekmoe_jax.cli.convert` and the library `deepseekmoe_jax.convert`.
This package is not installed; it exists so that ``python -m convert`` works in the repository root.
"""
