"""One process of the multi-process test (tests/test_multiprocess.py), and the step it runs.

Run as a script, it joins a multi-process run through `deepseekmoe_jax.distributed.initialize` (configured by the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables the test sets), loads only its own rows of
the global batch, runs one sharded training step (LM loss + balance loss, gradient, SGD-with-momentum update) and
writes what it saw to ``--out`` (JSON; process 0 also writes the updated parameters gathered from all processes).

Imported, `run_step` runs the same step on whatever devices the caller has, so the test can compare a
two-process run with a single-process run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

MESH = {"expert": 8}  # every collective of the step (all-to-all included) crosses the process boundary
GLOBAL_BATCH, SEQ_LEN = 8, 16
LEARNING_RATE = 0.5


@functools.cache
def fast_compile() -> dict:
    """XLA options that make CPU compilation several times faster for these tiny models: LLVM -O0 and the
    classic (non-"fusion emitter") CPU kernel generator. Both act after partitioning, so shardings and collectives
    are unchanged, and every compared computation in the tests is compiled with the same options. Options this
    XLA build does not know are left out. Call only after the JAX backend may be initialised.
    """
    import jax

    if jax.default_backend() != "cpu":
        return {}
    kept = {}
    for name, value in (("xla_backend_optimization_level", 0), ("xla_cpu_use_fusion_emitters", False)):
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile({**kept, name: value})
        except Exception:  # an option unknown to this XLA version: compile without it
            continue
        kept[name] = value
    return kept


def problem():
    """The config and the global batch (deterministic, the same in every process)."""
    from deepseekmoe_jax import DeepseekConfig

    config = DeepseekConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        max_position_embeddings=64,
        aux_loss_alpha=0.01,
        options={"moe_group_size": 8, "capacity_factor_train": 1.0, "init_std": 0.02},
    )
    rng = np.random.default_rng(1234)
    ids = rng.integers(0, config.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1)).astype(np.int32)
    mask = np.ones((GLOBAL_BATCH, SEQ_LEN), np.int32)
    mask[1, -5:] = 0  # some right padding: padded tokens take no expert slots and no loss
    mask[6, -2:] = 0
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": mask}
    return config, batch


def run_step(mesh, feed, *, gather_initial=False, save_to=None):
    """One sharded training step on ``mesh``; ``feed(global_batch, rules)`` places the batch on the mesh.

    Returns the metrics (dict of floats) and, as nested dicts of fully gathered numpy arrays, the initial
    parameters (None unless ``gather_initial``), the updated parameters and the optimizer's updates. With
    ``save_to``, the updated model is also saved there with `deepseekmoe_jax.save_checkpoint` (every process
    writes its shards) and loaded back onto ``mesh``; the reloaded parameters must equal the updated ones.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils

    from deepseekmoe_jax import partitioning, sharding

    config, batch = problem()
    rules = partitioning.rules_for(config)
    model = sharding.create_sharded_model(config, mesh, seed=0, compiler_options=fast_compile())
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(LEARNING_RATE, momentum=0.9)
    # The optimizer state is created sharded like the parameters: optax keeps the NNX variables (and with them
    # the logical axes) in its param-shaped state, so param_shardings covers both.
    abstract_state = jax.eval_shape(lambda p: (p, tx.init(p)), params)
    state_shardings = sharding.param_shardings(abstract_state, rules, mesh)
    state = jax.jit(lambda p: (p, tx.init(p)), out_shardings=state_shardings, compiler_options=fast_compile())(params)
    initial = None
    if gather_initial:
        initial = jax.tree.map(np.asarray, multihost_utils.process_allgather(nnx.to_pure_dict(params), tiled=True))

    def train_step(state, batch):
        params, opt_state = state

        def loss_fn(p):
            out = nnx.merge(graphdef, p)(batch["input_ids"], batch["attention_mask"], training=True)
            weights = batch["attention_mask"].astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["labels"])
            lm = jnp.sum(ce * weights) / jnp.sum(weights)
            return lm + out.aux_loss, (lm, out.aux_loss)

        (loss, (lm, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        update_sq = sum(jnp.sum(jnp.square(u)) for u in jax.tree.leaves(updates))
        metrics = {"loss": loss, "lm_loss": lm, "aux_loss": aux, "update_sq": update_sq}
        return (new_params, opt_state), (metrics, nnx.to_pure_dict(updates))

    step = sharding.jit_step(train_step, mesh, state_shardings, rules=rules, compiler_options=fast_compile())
    (new_params, _), (metrics, updates) = step(state, feed(batch, rules))
    values = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
    updated = multihost_utils.process_allgather(nnx.to_pure_dict(new_params), tiled=True)
    if save_to is not None:
        from deepseekmoe_jax import load_checkpoint, save_checkpoint

        save_checkpoint(nnx.merge(graphdef, new_params), save_to)
        reloaded = load_checkpoint(save_to, mesh=mesh)
        for a, b in zip(
            jax.tree.leaves(updated),
            jax.tree.leaves(
                multihost_utils.process_allgather(nnx.to_pure_dict(nnx.state(reloaded, nnx.Param)), tiled=True)
            ),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    updates = jax.tree.map(lambda u: np.asarray(u.addressable_data(0)), updates)  # replicated outputs
    return values, initial, jax.tree.map(np.asarray, updated), updates


def flatten(tree, prefix=""):
    """Nested dict of arrays -> {"a/b/c": array}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for this process's results")
    parser.add_argument("--save", help="also save the updated model here (a model directory) and reload it")
    args = parser.parse_args(argv)
    start = time.time()

    from deepseekmoe_jax import distributed  # initialise before anything touches the JAX backend

    launch = distributed.initialize(timeout_s=120)

    import jax

    from deepseekmoe_jax import sharding

    mesh = sharding.make_mesh(**MESH)
    global_rows = {}

    def feed(batch, rules):
        rows = distributed.process_batch_slice(GLOBAL_BATCH, sharding.batch_sharding(mesh, rules))
        global_rows["rows"] = [rows.start, rows.stop]
        local = {k: v[rows] for k, v in batch.items()}  # this process reads only its own rows
        return distributed.global_batch_from_local(local, mesh, GLOBAL_BATCH, rules)

    metrics, _, params, updates = run_step(mesh, feed, save_to=args.save)
    result = {
        "launch": None if launch is None else launch.source,
        "process_index": distributed.process_index(),
        "process_count": distributed.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "rows": global_rows["rows"],
        "metrics": metrics,
        "seconds": time.time() - start,
    }
    if distributed.is_main_process():
        stem = os.path.splitext(args.out)[0]
        np.savez(stem + ".params.npz", **flatten(params))
        np.savez(stem + ".updates.npz", **flatten(updates))
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
