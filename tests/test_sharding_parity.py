"""The trainer's sharded training step equals its single-device step, expert bytes are split, and experts move by
all-to-all.

For each mesh the trainer's own step (`make_train_step` over `plan_state`'s layout, compiled by
`placement.compile_train_step` exactly as `train` compiles it) is compared with an unsharded `jax.jit` of the same
step on one device: losses, the fraction of dropped assignments, the gradient norm and every gradient, in float32,
both with a capacity factor (tokens are dropped) and in no-drop mode. The gradients are read from the optimizer
state after the step: with clipping off, AdamW's first moment after one step is exactly ``(1 - b1) * gradient``.
The logits are those of the model rebuilt by the layout's `ModelBuilder` from the sharded parameters. Each step is
compiled once per module.
"""

import re

import jax
import numpy as np
import pytest
from conftest import small_config
from flax import nnx
from mp_worker import fast_compile

from deepseekmoe_jax import partitioning, sharding
from deepseekmoe_jax.model import DeepseekForCausalLM, abstract_model
from deepseekmoe_jax.train.optim import decay_mask, make_optimizer, make_schedule
from deepseekmoe_jax.train.placement import compile_train_step, micro_batch_sharding
from deepseekmoe_jax.train.settings import DataSettings, MeshSettings, RunConfig, TrainSettings
from deepseekmoe_jax.train.state import fresh_state, plan_state
from deepseekmoe_jax.train.step import ModelBuilder, TrainState, make_train_step

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
# The metrics of the trainer's step that are compared (the loss, its two parts, the dropped share per MoE layer).
METRICS = ("lm_loss", "aux_loss", "loss", "dropped_fraction", "grad_norm")


def make_config(capacity_factor):
    # [MoE, dense] x 2 in one scanned segment: 8 experts (divisible by every expert axis used), 4 heads.
    return small_config(
        num_hidden_layers=4,
        moe_layer_freq=2,
        first_k_dense_replace=0,
        aux_loss_alpha=0.01,
        options={"moe_group_size": 8, "capacity_factor_train": capacity_factor, "init_std": 0.02, "min_capacity": 1},
    )


def make_run(config):
    # No clipping, so that the optimizer's first moment is the gradient itself (times 1 - b1); loss chunks of 8
    # positions, so that the chunked cross-entropy runs as a scan.
    train = TrainSettings(batch_size=BATCH, seq_len=SEQ, grad_clip=0.0, loss_chunk_size=8)
    return RunConfig(model=config, train=train, data=DataSettings(), mesh=MeshSettings(), raw={})


def make_batch(config):
    """Token windows [micro-batches 1, B, T+1], as the trainer feeds them."""
    rng = np.random.default_rng(0)
    return rng.integers(0, config.vocab_size, (1, BATCH, SEQ + 1)).astype(np.int32)


def forward(build):
    """``(params, tokens [1, B, T+1]) -> logits [B, T, V]`` of the model the step builds, in training mode."""

    def logits(params, tokens):
        return build(params)(tokens[0, :, :-1], training=True).logits

    return logits


def gradients(run, opt_state):
    """The gradient of one step from AdamW's first moment ``mu = (1 - b1) * g`` (one step from zero, no clipping)."""
    return jax.tree.map(lambda m: np.asarray(m) / np.float32(1 - run.train.b1), first_moment(opt_state))


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def flat(tree):
    """(path, leaf) of each leaf of a nested dict, in key order."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in leaves]


def first_moment(opt_state):
    """AdamW's first moment ``mu`` in an optax state (a pytree like the parameters)."""
    (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    return adam.mu


@pytest.fixture(scope="module")
def reference():
    """Per mode: config, initial parameters (a pure dict of host copies) and the unsharded single-device results
    of the trainer's step: metrics, logits, gradients."""
    out = {}
    config = make_config(None)
    init = jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(DeepseekForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param)),
        compiler_options=FAST_COMPILE,
    )
    params = to_numpy(init())
    for mode, cf in MODES.items():
        config = make_config(cf)
        run = make_run(config)
        graphdef, abstract_params, _ = nnx.split(abstract_model(config), nnx.Param, ...)
        build = ModelBuilder(graphdef, abstract_params)
        optimizer = make_optimizer(run.train, decay_mask(abstract_params))
        step = make_train_step(build, optimizer, make_schedule(run.train), run.train.loss_chunk_size)
        state = TrainState(
            step=np.int32(0),
            params=params,
            opt_state=optimizer.init(params),
            rng=np.asarray(jax.random.key_data(jax.random.key(run.train.seed))),
            bad_step=np.int32(-1),
        )
        batch = make_batch(config)
        new_state, metrics = jax.jit(step, compiler_options=FAST_COMPILE)(state, batch)
        aux = {**to_numpy(metrics), "logits": np.asarray(jax.jit(forward(build))(params, batch))}
        out[mode] = dict(config=config, run=run, batch=batch, grads=gradients(run, new_state.opt_state), aux=aux)
    return params, out


@pytest.fixture(scope="module")
def sharded_runs(reference):
    """Results of the trainer's sharded step per (mesh, mode), computed on first use; keeps the compiled
    executables."""
    params, ref = reference
    cache = {}

    def get(mesh_name, mode):
        if (mesh_name, mode) not in cache:
            r = ref[mode]
            run = r["run"]
            mesh = sharding.make_mesh(**MESHES[mesh_name], config=r["config"])
            rules = partitioning.rules_for(r["config"])
            layout = plan_state(run, mesh, rules)
            micro_sh = micro_batch_sharding(mesh, rules)
            with partitioning.use_mesh(mesh, rules):
                state = fresh_state(layout, jax.device_put(params, layout.shardings.params), run.train.seed)
                logits = jax.jit(
                    forward(layout.build), in_shardings=(layout.shardings.params, micro_sh), out_shardings=None
                )(state.params, jax.device_put(r["batch"], micro_sh))
            compiled = compile_train_step(run, layout, mesh, rules, compiler_options=FAST_COMPILE)
            new_state, metrics = compiled(state, jax.device_put(r["batch"], micro_sh))  # the state is donated
            aux = {**to_numpy(metrics), "logits": np.asarray(logits)}
            cache[mesh_name, mode] = dict(
                mesh=mesh,
                params=new_state.params,
                param_shardings=layout.shardings.params,
                mu=first_moment(new_state.opt_state),
                grads=gradients(run, new_state.opt_state),
                aux=aux,
                compiled=compiled,
            )
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
    dropped = expected["aux"]["dropped_fraction"]
    if mode == "capacity":
        assert dropped.min() > 0, "the capacity factor should drop some assignments in every MoE layer"
    else:
        assert np.all(dropped == 0)
    for key in ("logits", *METRICS):
        assert_close(run["aux"][key], expected["aux"][key], f"{mesh_name}/{mode}: {key}")
    grads, ref_grads = flat(run["grads"]), flat(expected["grads"])
    assert len(grads) == len(ref_grads) > 0
    params, planned = flat(run["params"]), flat(run["param_shardings"])
    for (path, g), (ref_path, g_ref), (_, p), (_, want) in zip(grads, ref_grads, params, planned, strict=True):
        assert path == ref_path
        assert np.abs(g_ref).max() > 0, f"{path}: zero gradient in the reference"
        assert_close(g, g_ref, f"{mesh_name}/{mode}: gradient of {'/'.join(map(str, path))}")
        assert p.sharding.is_equivalent_to(want, p.ndim)  # the updated parameters keep the params' layout


@pytest.mark.parametrize("mesh_name", ["data2-expert4", "fsdp2-expert2-tensor2", "expert8"])
def test_optimizer_moments_are_laid_out_like_the_parameters(sharded_runs, mesh_name):
    run = sharded_runs(mesh_name, "capacity")
    for (path, m), (_, p) in zip(flat(run["mu"]), flat(run["params"]), strict=True):
        assert m.sharding.is_equivalent_to(p.sharding, m.ndim), path


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
        flat(nnx.to_pure_dict(born)), flat(params), flat(nnx.to_pure_dict(expected)), strict=True
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
