"""Sharded training steps equal the single-device step, expert bytes are split, and experts move by all-to-all.

For each mesh the same step (forward in training mode, LM cross-entropy + balance loss, gradients) is compiled with
the rules' shardings via `sharding.jit_step` and compared with an unsharded `jax.jit` of the same function on one
device: logits, losses and every gradient, in float32, both with a capacity factor (tokens are dropped) and in
no-drop mode. Each step is compiled once per module.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config
from flax import nnx
from mp_worker import fast_compile

from deepseekmoe_jax import partitioning, sharding
from deepseekmoe_jax.model import DeepseekForCausalLM, abstract_model

# Faster CPU compilation of the tiny test models; see mp_worker.fast_compile.
FAST_COMPILE = fast_compile()

MESHES = {
    "1 device": dict(devices=jax.devices()[:1]),
    "data2-expert4": dict(data=2, expert=4),
    "fsdp2-expert2-tensor2": dict(fsdp=2, expert=2, tensor=2),
    "expert8": dict(expert=8),
}
# capacity factor 1.0 with groups of 8 tokens: 2 slots per expert and group, so some assignments are dropped.
MODES = {"capacity": 1.0, "no-drop": None}
BATCH, SEQ = 8, 16
RTOL = 1e-5  # float32; atol is RTOL times the largest magnitude of the compared array


def make_config(capacity_factor):
    # [MoE, dense] x 2 in one scanned segment: 8 experts (divisible by every expert axis used), 4 heads.
    return small_config(
        num_hidden_layers=4,
        moe_layer_freq=2,
        first_k_dense_replace=0,
        aux_loss_alpha=0.01,
        options={"moe_group_size": 8, "capacity_factor_train": capacity_factor, "init_std": 0.02, "min_capacity": 1},
    )


def make_batch(config):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[2, -6:] = 0  # right padding in two rows: padded tokens take no expert slots and carry no loss
    mask[5, -3:] = 0
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": mask}


def make_step(graphdef):
    def step(params, batch):
        def loss_fn(params):
            out = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"], training=True)
            weights = batch["attention_mask"].astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["labels"])
            lm = jnp.sum(ce * weights) / jnp.sum(weights)
            aux = {"logits": out.logits, "lm": lm, "aux": out.aux_loss, "dropped": out.moe_metrics.dropped_fraction}
            return lm + out.aux_loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {**aux, "loss": loss}

    return step


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


@pytest.fixture(scope="module")
def reference():
    """Per mode: config, initial parameters (host copies) and the unsharded single-device results."""
    out = {}
    config = make_config(None)
    graphdef, abstract = nnx.split(abstract_model(config))
    init = jax.jit(lambda: nnx.state(DeepseekForCausalLM(config, rngs=nnx.Rngs(0))), compiler_options=FAST_COMPILE)
    params = init()
    for mode, cf in MODES.items():
        config = make_config(cf)
        graphdef = nnx.graphdef(abstract_model(config))
        batch = make_batch(config)
        grads, aux = jax.jit(make_step(graphdef), compiler_options=FAST_COMPILE)(params, batch)
        out[mode] = dict(config=config, graphdef=graphdef, batch=batch, grads=to_numpy(grads), aux=to_numpy(aux))
    return params, out


@pytest.fixture(scope="module")
def sharded_runs(reference):
    """Results of the sharded step per (mesh, mode), computed on first use; keeps the compiled executables."""
    params, ref = reference
    cache = {}

    def get(mesh_name, mode):
        if (mesh_name, mode) not in cache:
            r = ref[mode]
            mesh = sharding.make_mesh(**MESHES[mesh_name], config=r["config"])
            rules = partitioning.rules_for(r["config"])
            shardings = sharding.param_shardings(params, rules, mesh)
            placed = jax.device_put(params, shardings)
            step = sharding.jit_step(make_step(r["graphdef"]), mesh, shardings, rules=rules)
            batch = sharding.shard_batch(r["batch"], mesh, rules)
            compiled = step.lower(placed, batch).compile(FAST_COMPILE)
            grads, aux = compiled(placed, batch)
            cache[mesh_name, mode] = dict(mesh=mesh, params=placed, grads=grads, aux=aux, compiled=compiled)
        return cache[mesh_name, mode]

    return get


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_step_equals_single_device(reference, sharded_runs, mesh_name, mode):
    _, ref = reference
    run = sharded_runs(mesh_name, mode)
    expected = ref[mode]
    dropped = expected["aux"]["dropped"]
    if mode == "capacity":
        assert dropped.min() > 0, "the capacity factor should drop some assignments in every MoE layer"
    else:
        assert np.all(dropped == 0)
    aux = to_numpy(run["aux"])
    for key in ("logits", "lm", "aux", "loss", "dropped"):
        assert_close(aux[key], expected["aux"][key], f"{mesh_name}/{mode}: {key}")
    grads = nnx.to_flat_state(run["grads"])
    ref_grads = nnx.to_flat_state(expected["grads"])
    assert len(grads) == len(ref_grads) > 0
    params = nnx.to_flat_state(run["params"])
    for (path, g), (ref_path, g_ref), (_, p) in zip(grads, ref_grads, params, strict=True):
        assert path == ref_path
        assert np.abs(g_ref[...]).max() > 0, f"{path}: zero gradient in the reference"
        assert_close(g[...], g_ref[...], f"{mesh_name}/{mode}: gradient of {'/'.join(map(str, path))}")
        assert g[...].sharding.is_equivalent_to(p[...].sharding, g[...].ndim)  # gradients keep the params' layout


@pytest.mark.parametrize("mesh_name, shards", [("data2-expert4", 4), ("fsdp2-expert2-tensor2", 8), ("expert8", 8)])
def test_each_device_holds_its_share_of_expert_bytes(sharded_runs, mesh_name, shards):
    run = sharded_runs(mesh_name, "capacity")
    mesh = run["mesh"]
    experts = run["params"]["model"]["segments"][0]["layers"][0]["mlp"]["experts"]
    for name in ("w_gate", "w_up", "w_down"):
        array = experts[name][...]
        assert {s.device for s in array.addressable_shards} == set(mesh.devices.flat)
        per_device = {}
        for s in array.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
        assert set(per_device.values()) == {array.nbytes // shards}, (name, per_device)
        shard_shape = array.addressable_shards[0].data.shape
        assert shard_shape[1] == array.shape[1] // dict(mesh.shape)["expert"]  # [layers, E / expert, ...]


def test_create_sharded_model_matches_reference_values(reference):
    params, ref = reference
    config = ref["capacity"]["config"]
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    model = sharding.create_sharded_model(config, mesh, seed=0, compiler_options=FAST_COMPILE)
    born = nnx.state(model)
    expected = sharding.param_shardings(born, partitioning.rules_for(config), mesh)
    for (path, a), (_, b), (_, s) in zip(
        nnx.to_flat_state(born), nnx.to_flat_state(params), nnx.to_flat_state(expected), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
        assert a[...].sharding == s, path


def collectives(hlo_text):
    """Names of the collective operations in optimized HLO text, with their op_name metadata."""
    ops = []
    for line in hlo_text.splitlines():
        # the opcode is preceded by the result type (a tuple type for the variadic all-to-all) and followed by "("
        m = re.search(r"\s(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(-start)?\(", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops.append((m.group(1), op_name.group(1) if op_name else ""))
    return ops


@pytest.mark.parametrize("mesh_name", ["expert8", "data2-expert4", "fsdp2-expert2-tensor2"])
def test_expert_sharded_step_uses_all_to_all(sharded_runs, mesh_name):
    ops = collectives(sharded_runs(mesh_name, "capacity")["compiled"].as_text())
    kinds = [kind for kind, _ in ops]
    # Per MoE layer the tokens go to their experts and come back by all-to-all, in the forward pass and again (the
    # transposes) in the backward pass; the scanned layer body is compiled once.
    assert kinds.count("all-to-all") >= 4, sorted(set(kinds))
    # Neither einsum of the dispatch / combine pair is carried out by gathering every group's tokens or by summing
    # full outputs over devices (what XLA does without the group-layout constraints in moe.py).
    for kind, op_name in ops:
        if kind in ("all-gather", "all-reduce"):
            assert "gsec,gsh->egch" not in op_name and "gsec,egch->gsh" not in op_name, (kind, op_name)
    # The routing stays with its tokens: no collective gathers gate scores for the top-k (a stable sort in moe.route;
    # XLA would gather the whole [b, t, e] score tensor for a lax.top_k).
    gathered = [op_name for kind, op_name in ops if kind == "all-gather"]
    assert not any(("sort" in n or "top_k" in n or "softmax" in n) for n in gathered), gathered


def test_single_device_step_has_no_collectives(sharded_runs):
    assert collectives(sharded_runs("1 device", "capacity")["compiled"].as_text()) == []
