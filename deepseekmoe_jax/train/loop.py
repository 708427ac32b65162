"""The training loop: `train` sets up a run (mesh, data, model and optimizer), then runs, evaluates, logs and
checkpoints it, resuming where the run directory's newest intact checkpoint left off.

`train` is what ``python train.py`` calls. A resume is exact: parameters, optimizer state, step, data position and
RNG come back, and the same compiled step runs on the same batches. A non-finite loss stops the run naming the
step, keeping the last good checkpoint.

Its parts live beside it: the run directory and its lock in `run_dir`, the data in `inputs`, the train state and
resume from damaged checkpoints in `state`, the mesh and the compiled step in `placement`, stop signals in
`signals`.

Stop requests: SIGTERM and a first SIGINT are handled for the whole of `train` (set-up, the loop, the final save
and the final evaluation): during set-up the run exits as "terminated" (nothing new to save), during the loop it
saves and exits, after the last step the final save and evaluation still complete. A second SIGINT raises
KeyboardInterrupt. A rerun of a completed run whose final evaluation is missing from ``metrics.jsonl`` runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import deepseekmoe_jax.train.flops as flops_lib
from deepseekmoe_jax import distributed
from deepseekmoe_jax import sharding as sh
from deepseekmoe_jax.model import moe_layer_indices, param_count
from deepseekmoe_jax.partitioning import rules_for, use_mesh
from deepseekmoe_jax.train.checkpointing import RunCheckpointer
from deepseekmoe_jax.train.data import global_batch
from deepseekmoe_jax.train.errors import NonFiniteLoss
from deepseekmoe_jax.train.inputs import data_sources
from deepseekmoe_jax.train.metrics import JSONL_FILE, MetricsLogger, has_record
from deepseekmoe_jax.train.placement import (
    build_mesh,
    check_settings,
    compile_train_step,
    enable_compilation_cache,
    micro_batch_sharding,
)
from deepseekmoe_jax.train.run_dir import check_run_dir, claim_run_dir, display_path, write_run_dir
from deepseekmoe_jax.train.settings import RunConfig, precision_warnings
from deepseekmoe_jax.train.signals import StopVote, signal_name, stop_on_signals
from deepseekmoe_jax.train.state import plan_state, start_state
from deepseekmoe_jax.train.step import make_eval_step


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did: ``status`` is "completed", "terminated" (signal) or "already_complete"."""

    status: str
    run_dir: str
    step: int
    checkpoint: str | None
    last_metrics: dict[str, Any]
    eval_metrics: dict[str, Any] | None


def train(run: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) the training described by ``run``; see the module docstring.

    Raises `TrainError` (bad settings, `NonFiniteLoss`, `RunDirLocked`), `ConfigError`, `DataError`,
    `ShardingError` or `CheckpointError` with a message naming what to fix, and KeyboardInterrupt on a second
    SIGINT. Returns a `TrainResult`.
    """
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, run_dir=os.path.abspath(run.train.run_dir)))
    # The stop handler covers everything, set-up and the final save and evaluation included.
    with stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        return _train(run, stop, cleanup, progress=progress, log=log)


def _train(run: RunConfig, stop, cleanup: contextlib.ExitStack, *, progress: bool, log) -> TrainResult:
    s, config, run_dir = run.train, run.model, run.train.run_dir
    is_main = distributed.is_main_process()
    multi_process = jax.process_count() > 1
    say = log if is_main else (lambda _msg: None)
    if s.compilation_cache:
        enable_compilation_cache(s.compilation_cache)
    for w in precision_warnings(run):
        say(f"warning: {w}")

    mesh = build_mesh(run.mesh)
    sh.check_mesh_fits(config, mesh)
    rules = rules_for(config)
    micro_sh = micro_batch_sharding(mesh, rules)  # [A, B, T+1]
    check_settings(run, mesh, rules)

    # The run directory: writable, and ours alone (process 0 holds the lock for all processes); left as it was if
    # set-up fails before anything is written into it.
    claim_run_dir(run_dir, cleanup)

    def stopped_during_setup(where: str, step: int = 0, checkpoint: str | None = None) -> TrainResult | None:
        """A stop request before training starts ends the run here; nothing new exists to be saved. (A
        multi-process run carries the request into the loop, where all processes stop together.)"""
        if multi_process or not stop.is_set():
            return None
        say(f"{signal_name(stop)} received during set-up ({where}): exiting before training (nothing new to save)")
        return TrainResult("terminated", run_dir, step, checkpoint, {}, None)

    dataset, train_src, eval_src = data_sources(run, say)
    if (result := stopped_during_setup("data")) is not None:
        return result

    checkpointer = RunCheckpointer(run_dir, keep=s.keep_checkpoints, async_save=s.async_checkpointing)
    cleanup.callback(checkpointer.close)
    for partial in checkpointer.removed_partial_saves:
        say(f"removed {display_path(partial)}: an incomplete checkpoint save left by an interrupted run")
    check_run_dir(run, resuming=bool(checkpointer.all_steps()))  # before anything in the run directory is rewritten
    layout = plan_state(run, mesh, rules)
    with use_mesh(mesh, rules):
        state, position = start_state(run, layout, checkpointer, mesh, rules, say)
    write_run_dir(run, dataset)
    start_step = int(state.step)
    latest = checkpointer.latest_step()
    restored = checkpointer.step_dir(latest) if latest is not None else None
    if (result := stopped_during_setup("state restored", start_step, restored)) is not None:
        return result

    fpt = flops_lib.training_flops_per_token(config, s.seq_len)
    device_kind = jax.devices()[0].device_kind
    peak, peak_source = flops_lib.peak_flops(device_kind, config.options.dtype, s.peak_flops)
    say(
        f"model: {config.num_hidden_layers} layers ({len(moe_layer_indices(config))} MoE), hidden "
        f"{config.hidden_size}, {param_count(layout.abstract.params):,} parameters, "
        f"{flops_lib.activated_params(config)['total']:,} activated matmul parameters per token, "
        f"{fpt / 1e6:,.1f} MFLOP per training token"
    )
    say(f"mesh: {dict(mesh.shape)} over {mesh.size} {device_kind} device(s), {jax.process_count()} process(es)")
    if peak is None:
        say(f"MFU: not reported ({peak_source})")
    say(
        f"run: {display_path(run_dir)} | steps {s.steps} | batch {s.batch_size} x {s.seq_len} tokens"
        f"{f' in {s.grad_accum} micro-batches' if s.grad_accum > 1 else ''} | lr {s.learning_rate:g} "
        f"({s.schedule}, warmup {s.warmup_steps})"
    )
    complete = start_step >= s.steps
    final_eval_missing = (
        complete and eval_src is not None and not has_record(os.path.join(run_dir, JSONL_FILE), start_step, "eval_loss")
    )
    if complete and not final_eval_missing:
        say(f"run already complete: step {start_step} >= train.steps={s.steps}")
        return TrainResult("already_complete", run_dir, start_step, restored, {}, None)

    shape = (s.grad_accum, s.micro_batch_size)
    # One process decides alone when to stop; several agree through the step itself (see StopVote).
    vote = StopVote(mesh) if multi_process else None
    compiled_step = None
    if not complete:
        t0 = time.perf_counter()
        say("compiling the training step ...")
        compiled_step = compile_train_step(run, layout, mesh, rules, vote=vote)
        say(f"compiled in {time.perf_counter() - t0:.1f} s")
    eval_fn = None
    if eval_src is not None:  # traced (under the mesh) at its first call, in evaluate
        eval_fn = jax.jit(
            make_eval_step(layout.build, s.loss_chunk_size),
            in_shardings=(layout.shardings.params, micro_sh),
            out_shardings=layout.replicated,
        )
    if not complete and (result := stopped_during_setup("compiled", start_step, restored)) is not None:
        return result

    logger = MetricsLogger(
        run_dir,
        total_steps=s.steps,
        start_step=start_step,
        tensorboard=s.tensorboard,
        enabled=is_main,
        progress=progress,
    )
    cleanup.callback(logger.close)
    for note in logger.notes:
        say(note)

    def evaluate(params, step) -> dict[str, Any]:
        n_batches = min(s.eval_batches, math.ceil(eval_src.num_windows / s.micro_batch_size))
        nll = count = 0.0
        with use_mesh(mesh, rules):
            for i in range(n_batches):
                tokens = global_batch(eval_src, i * s.micro_batch_size, (1, s.micro_batch_size), micro_sh)
                a, b = eval_fn(params, tokens)
                nll, count = nll + float(a), count + float(b)
        loss = nll / count
        rec = {"step": step, "eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 700.0)))}
        logger.write(rec)
        logger.message(f"eval   step {step:>6} | loss {loss:.4f} | perplexity {rec['eval_perplexity']:.2f}")
        return rec

    if complete:  # killed during (or before) its final evaluation: do that now, from the final checkpoint
        logger.message(
            f"run already complete: step {start_step} >= train.steps={s.steps}, but its final evaluation is missing "
            f"from {display_path(logger.jsonl_path)}: evaluating"
        )
        eval_record = evaluate(state.params, start_step)
        return TrainResult("already_complete", run_dir, start_step, restored, {}, eval_record)

    def check_finite(step_now: int, bad: int | None = None) -> None:
        """Raise `NonFiniteLoss` if a step went bad; ``bad`` is ``state.bad_step`` when already on the host."""
        bad = int(state.bad_step) if bad is None else int(bad)
        if bad >= 0:
            last = checkpointer.latest_step()
            where = checkpointer.step_dir(last) if last is not None else None
            raise NonFiniteLoss(
                f"the loss or gradient norm became NaN/inf at step {bad} (detected by step {step_now}); "
                "training stopped without saving. "
                + (f"The last good checkpoint is {where}. " if where else "No checkpoint was written yet. ")
                + "Lower train.learning_rate, check the data, or use float32 compute (options.dtype).",
                bad,
                where,
            )

    def save(step_now: int) -> None:
        check_finite(step_now)
        host_state = {
            "data_position": position,
            "tokens_seen": position * s.seq_len,
            "seed": s.seed,
            "seq_len": s.seq_len,
        }
        checkpointer.save(state, host_state)

    last_record: dict[str, Any] = {}
    eval_record = None
    status = "completed"
    step = start_step
    t_mark, step_mark = time.perf_counter(), step
    while step < s.steps:
        if stop.is_set() if vote is None else vote.agreed():
            status = "terminated"
            if stop.is_set():
                reason = f"{signal_name(stop)} received"
            else:
                reason = "another process received a stop signal"
            logger.message(f"{reason}: saving a checkpoint at step {step} before exiting")
            break
        batch = global_batch(train_src, position, shape, micro_sh)
        if vote is None:
            state, metrics = compiled_step(state, batch)
        else:
            state, metrics, any_stop = compiled_step(state, batch, vote.flags(stop.is_set()))
            vote.record(any_stop)
        position += s.batch_size
        step += 1
        logger.advance(1)
        if step % s.log_every == 0 or step == s.steps:
            # One transfer (one wait for the step) for both the finiteness flag and the metrics.
            bad, host_metrics = jax.device_get((state.bad_step, metrics))
            check_finite(step, bad)
            now = time.perf_counter()
            tps = (step - step_mark) * s.batch_size * s.seq_len / max(now - t_mark, 1e-9)
            t_mark, step_mark = now, step
            rec = {"step": step}
            for k, v in host_metrics.items():
                rec[k] = np.asarray(v).tolist() if np.ndim(v) else float(v)
            rec.update(
                tokens_per_second=tps,
                mfu=flops_lib.mfu(fpt, tps, mesh.size, peak),
                tokens_seen=position * s.seq_len,
            )
            logger.write(rec)
            logger.message(_fmt_record(rec))
            logger.advance(0, loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}")
            last_record = rec
        if eval_fn is not None and s.eval_every > 0 and step % s.eval_every == 0 and step < s.steps:
            check_finite(step)
            eval_record = evaluate(state.params, step)
            t_mark, step_mark = time.perf_counter(), step
        if step % s.checkpoint_every == 0 or step == s.steps:
            save(step)
    if status == "terminated" or step == s.steps:
        save(step)
    if status == "completed" and eval_fn is not None:
        eval_record = evaluate(state.params, step)
    checkpointer.wait()  # the final checkpoint is on disk before this returns, whatever arrives meanwhile
    if status == "completed" and stop.is_set():
        logger.message(
            f"{signal_name(stop)} received after the last step: the final checkpoint and evaluation were completed"
        )
    final = checkpointer.latest_step()
    return TrainResult(
        status, run_dir, step, checkpointer.step_dir(final) if final is not None else None, last_record, eval_record
    )


def _fmt_record(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}", f"lm {r['lm_loss']:.4f}", f"aux {r['aux_loss']:.4f}"]
    parts += [f"gnorm {r['grad_norm']:.3f}", f"lr {r['learning_rate']:.2e}", f"{r['tokens_per_second']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if "dropped_fraction" in r:
        parts.append(f"dropped {100 * float(np.mean(r['dropped_fraction'])):.1f}%")
        parts.append(f"imbalance {float(np.max(r['load_imbalance'])):.2f}")
    return " | ".join(parts)
