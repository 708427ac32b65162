"""Bar chart (PNG) of the one-MoE-layer benchmark, from the file ``bench/moe_layer.py --json`` writes.

    python bench/plot_moe_layer.py ROWS.json [--out docs/moe_layer.png]

One panel per token count (the main rows, then the decode rows): horizontal bars of fwd and fwd+bwd milliseconds
per implementation on a logarithmic axis; rows without a time (not offered by the installed code, skipped, over
budget, failed) are labelled with their reason instead of a bar. Needs matplotlib; without it the script says so
and exits with status 1 (it installs nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def seconds(cell: dict) -> float | None:
    if not cell or cell.get("status") != "ok":
        return None
    return statistics.median(cell["times"]) if cell["times"] else cell["warmup"]


def reason(row: dict) -> str:
    if row.get("note"):
        return row["note"]
    for key in ("fwd", "fwd_bwd"):
        status = (row.get(key) or {}).get("status", "")
        if status and status != "ok":
            return status
    return ""


def panels(rows: list[dict]) -> list[tuple[int, list[dict]]]:
    """Rows grouped by token count, largest count first, each group in the benchmark's order."""
    counts = sorted({r["tokens"] for r in rows}, reverse=True)
    return [(n, [r for r in rows if r["tokens"] == n]) for n in counts]


def draw(data: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels(data["rows"])
    heights = [max(2.0, 0.55 * len(rows) + 1.0) for _, rows in groups]
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(10, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (tokens, rows) in zip(axes[:, 0], groups, strict=True):
        names = [r["name"] for r in rows]
        ys = range(len(rows))
        fwd = [seconds(r["fwd"]) for r in rows]
        bwd = [seconds(r["fwd_bwd"]) for r in rows]
        bar = 0.38
        for offset, values, label, color in ((-bar / 2, fwd, "fwd", "#4c72b0"), (bar / 2, bwd, "fwd+bwd", "#dd8452")):
            for y, v in zip(ys, values, strict=True):
                if v is not None:
                    ax.barh(y + offset, 1e3 * v, height=bar, color=color, label=label)
                    ax.text(1e3 * v, y + offset, f" {1e3 * v:.3g}", va="center", fontsize=7)
        ax.set_xscale("log")
        known = [1e3 * v for v in fwd + bwd if v is not None]
        lo = min(known) / 3 if known else 0.1
        for y, r in zip(ys, rows, strict=True):
            text = reason(r)
            if text:
                ax.text(lo * 1.1, y, text, va="center", fontsize=7, color="#555555")
        if known:
            ax.set_xlim(lo, max(known) * 4)
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds (log scale)")
        ax.set_title(f"one MoE layer, {tokens} token{'s' if tokens != 1 else ''}", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.3)
    env = data.get("environment", "")
    fig.suptitle(env[:160] + ("..." if len(env) > 160 else ""), fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", help="the JSON file of bench/moe_layer.py --json")
    p.add_argument("--out", default="docs/moe_layer.png")
    args = p.parse_args(argv)
    with open(args.rows, encoding="utf-8") as f:
        data = json.load(f)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed here; no chart drawn (install it to draw one)", file=sys.stderr)
        return 1
    draw(data, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
