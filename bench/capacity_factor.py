"""Train briefly at several MoE capacity factors and compare dropped assignments, loss and step time.

    python bench/capacity_factor.py [--config configs/tiny.yaml] [--steps 150] [--factors 1.0,1.25,1.5,2.0,none]
                                    [--markdown FILE]

Every run starts from the same initial parameters and sees the same batches (same seed); only
``options.capacity_factor_train`` differs ("none" = no-drop: every expert gets a slot for every token of a group).
Evaluation always uses the exact no-drop dispatch, so the eval loss compares the models themselves.

Columns: dropped = mean fraction of (token, choice) assignments that found no slot, over MoE layers and over the
logged steps of the second half of the run; train loss = mean LM loss of the last 10 logged steps; eval loss = on
the held-out split at the end; step time = median seconds per optimizer step over logged intervals after the
first (compilation excluded); tokens/s likewise. Runs live in ``--work-dir``/<factor> and are replaced on every
call. Because a shared machine makes those timings drift between runs,
a second table times the compiled steps of all factors interleaved in one process (round robin, same batch,
median over ``--timing-rounds`` rounds); the dispatch cost depends only on the capacity, not on the routing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepseekmoe_jax.config_files import parse_value  # noqa: E402
from deepseekmoe_jax.train import load_run_config, train  # noqa: E402
from deepseekmoe_jax.train.metrics import read_jsonl  # noqa: E402

LOG_EVERY = 5
MIN_STEPS = 2 * LOG_EVERY  # two logged steps, one of them in the second half of the run


def parse_factors(text: str) -> list[float | None]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(None if item in ("none", "null", "nodrop", "no-drop") else float(item))
    return out


def run_one(config: str, factor: float | None, steps: int, work_dir: str, overrides: dict) -> dict:
    name = "nodrop" if factor is None else f"cf{factor:g}"
    run_dir = os.path.join(work_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time: an existing one would only be resumed
    merged = {
        **overrides,
        "options.capacity_factor_train": factor,
        "train.steps": steps,
        "train.run_dir": run_dir,
        "train.log_every": LOG_EVERY,
        "train.eval_every": 0,
        "train.checkpoint_every": steps,
        "train.keep_checkpoints": 1,
        "train.tensorboard": False,
        "train.compilation_cache": os.path.join(work_dir, ".jax_cache"),
        "data.path": os.path.join(work_dir, "data") if overrides.get("data.path") is None else overrides["data.path"],
        "data.corpus": None,
    }
    run = load_run_config(config, merged)
    if not os.path.isfile(os.path.join(run.data.path, "dataset.json")):
        from deepseekmoe_jax.tokenizer import ByteTokenizer
        from deepseekmoe_jax.train.data import prepare, stdlib_sources

        prepare(stdlib_sources(), run.data.path, ByteTokenizer(), val_fraction=0.02, progress=False)
    result = train(run, progress=False, log=lambda m: print(f"  [{name}] {m}", flush=True))
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train_recs = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    second_half = [r for r in train_recs if r["step"] > steps // 2]
    dropped = statistics.mean(statistics.mean(r["dropped_fraction"]) for r in second_half)
    imbalance = statistics.mean(max(r["load_imbalance"]) for r in second_half)
    tps = statistics.median(r["tokens_per_second"] for r in train_recs[1:])
    tokens_per_step = run.train.batch_size * run.train.seq_len
    return {
        "factor": "no-drop" if factor is None else f"{factor:g}",
        "dropped": dropped,
        "imbalance": imbalance,
        "train_loss": statistics.mean(r["lm_loss"] for r in train_recs[-10:]),
        "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
        "step_time": tokens_per_step / tps,
        "tokens_per_second": tps,
        "status": result.status,
    }


def interleaved_timing(config: str, factors: list[float | None], rounds: int, work_dir: str, overrides: dict):
    """Median seconds per training step of each factor, timed round robin in one process."""
    import time

    import jax
    import jax.numpy as jnp

    from deepseekmoe_jax.partitioning import rules_for, use_mesh
    from deepseekmoe_jax.train.placement import build_mesh, compile_train_step, micro_batch_sharding
    from deepseekmoe_jax.train.state import fresh_state, initial_params, plan_state

    steps = {}
    for factor in factors:
        run = load_run_config(config, {**overrides, "options.capacity_factor_train": factor, "data.corpus": None})
        mesh = build_mesh(run.mesh)
        rules = rules_for(run.model)
        layout = plan_state(run, mesh, rules)
        micro = micro_batch_sharding(mesh, rules)
        with use_mesh(mesh, rules):
            state = fresh_state(layout, initial_params(run, mesh, rules, lambda _m: None), seed=0)
        compiled = compile_train_step(run, layout, mesh, rules)  # the trainer's step; it donates the state
        shape = (run.train.grad_accum, run.train.micro_batch_size, run.train.seq_len + 1)
        batch = jax.device_put(jnp.asarray(jax.random.randint(jax.random.key(1), shape, 3, 259)), micro)
        state, _ = jax.block_until_ready(compiled(state, batch))  # warm up
        steps[factor] = [compiled, state, batch]
    times = {f: [] for f in factors}
    for _ in range(rounds):
        for f in factors:
            compiled, state, batch = steps[f]
            t = time.perf_counter()
            steps[f][1], _ = jax.block_until_ready(compiled(state, batch))
            times[f].append(time.perf_counter() - t)
    return {f: statistics.median(v) for f, v in times.items()}


def timing_table(medians: dict, tokens_per_step: int) -> str:
    lines = ["| capacity factor | step time (s), interleaved median | tokens/s | vs no-drop |", "|---|---|---|---|"]
    base = medians.get(None)
    for f, t in medians.items():
        rel = f"{t / base:.2f}x" if base else "-"
        name = "no-drop" if f is None else f"{f:g}"
        lines.append(f"| {name} | {t:.3f} | {tokens_per_step / t:,.0f} | {rel} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| capacity factor | dropped (2nd half) | max load / mean | train LM loss (last 10) | eval loss | "
        "step time (s) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['factor']} | {100 * r['dropped']:.1f}% | {r['imbalance']:.2f} | {r['train_loss']:.4f} | "
            f"{r['eval_loss']:.4f} | {r['step_time']:.3f} | {r['tokens_per_second']:,.0f} |"
        )
    return "\n".join(lines)


def environment() -> str:
    import flax
    import jax
    import optax

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} CPU cores, "
        f"{jax.devices()[0].device_kind} backend {jax.default_backend()}, python {platform.python_version()}, "
        f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}; load average at the end "
        f"{load:.1f}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--factors", default="1.0,1.25,1.5,2.0,none")
    p.add_argument("--work-dir", default="runs/bench_capacity")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--timing-rounds", type=int, default=20, help="rounds of the interleaved timing (0: skip)")
    p.add_argument("--timing-only", action="store_true", help="skip the training runs, only time the steps")
    p.add_argument("--markdown", help="also write the table with its setup to this file")
    args = p.parse_args(argv)
    if not args.timing_only and args.steps < MIN_STEPS:
        # Metrics are logged every LOG_EVERY steps: fewer steps leave no logged step to average over.
        p.error(f"--steps {args.steps}: the training runs need at least {MIN_STEPS} steps (or pass --timing-only)")
    overrides = {}
    for item in args.overrides:
        k, _, v = item.partition("=")
        overrides[k] = parse_value(v)
    rows = []
    for factor in [] if args.timing_only else parse_factors(args.factors):
        print(f"capacity factor {factor}:", flush=True)
        rows.append(run_one(args.config, factor, args.steps, args.work_dir, overrides))
    run = load_run_config(args.config, overrides)
    setup = (
        f"{args.config} ({run.model.n_routed_experts} routed experts, top-{run.model.num_experts_per_tok}, "
        f"group size {run.model.options.moe_group_size}, aux_loss_alpha {run.model.aux_loss_alpha}), "
        + ("" if args.timing_only else f"{args.steps} steps of ")
        + f"{run.train.batch_size} x {run.train.seq_len} tokens per step, "
        f"Python standard library bytes; {environment()}"
    )
    text = table(rows) if rows else ""
    if args.timing_rounds > 0:
        factors = parse_factors(args.factors)
        medians = interleaved_timing(args.config, factors, args.timing_rounds, args.work_dir, overrides)
        tokens_per_step = run.train.batch_size * run.train.seq_len
        text += (
            ("\n\n" if text else "")
            + f"Step time with all factors timed round robin in one process ({args.timing_rounds} rounds, "
            f"same batch):\n\n" + timing_table(medians, tokens_per_step)
        )
    print()
    print(setup)
    print(text)
    if args.markdown:
        cmd = "python bench/capacity_factor.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(f"## Capacity factor (training)\n\nCommand: `{cmd.strip()}`\n\nSetup: {setup}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
