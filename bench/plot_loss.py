"""Plot a run's loss curve from its metrics.jsonl.

    python bench/plot_loss.py runs/tiny/metrics.jsonl --output docs/loss_curve.png [--title "..."]

Training LM loss (every logged step) and held-out loss (every evaluation) against the optimizer step, with the
share of MoE assignments dropped for lack of capacity (mean over MoE layers) on a second axis.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepseekmoe_jax.train.metrics import read_jsonl  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot train/held-out loss and dropped assignments from a metrics.jsonl.")
    p.add_argument("metrics", help="RUN/metrics.jsonl")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(args.metrics)
    train = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        print(f"error: {args.metrics} has no training records", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss", color="tab:blue")
    if evals:
        ax.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss", color="tab:red"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    if "dropped_fraction" in train[0]:
        dropped = [100 * sum(r["dropped_fraction"]) / len(r["dropped_fraction"]) for r in train]
        ax2.plot([r["step"] for r in train], dropped, label="dropped assignments (%)", color="tab:gray", alpha=0.7)
        ax2.set_ylabel("dropped assignments, % (mean over MoE layers)")
        ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title(args.title or os.path.dirname(os.path.abspath(args.metrics)))
    fig.tight_layout()
    tmp = args.output + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
