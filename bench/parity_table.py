"""Print the logit-parity table: DeepseekForCausalLM vs the transformers-based PyTorch reference, float32.

    python bench/parity_table.py [--seeds 0 1 2]

Each row is a configuration of the small test model (see tests/conftest.py) with random weights drawn per seed;
the value is max |logit_jax - logit_torch| / max |logit_torch| over all positions (and over the real positions of
a left-padded batch in the last column). The tests assert <= 1e-4.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from conftest import small_config  # noqa: E402
from test_parity import CASES  # noqa: E402

from deepseekmoe_jax.reference import compare_with_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    import jax
    import torch
    import transformers

    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print("| configuration | seeds | worst rel. diff | left-padded batch |")
    print("|---|---|---|---|")
    for name, changes in CASES.items():
        config = small_config(**changes)
        diffs = compare_with_reference(config, tuple(args.seeds))
        padded = compare_with_reference(config, tuple(args.seeds[:1]), left_pad=5)
        print(f"| {name} | {len(args.seeds)} | {max(diffs):.1e} | {max(padded):.1e} |", flush=True)


if __name__ == "__main__":
    main()
