"""The three dispatch paths of the MoE block agree where they should, and "auto" picks the exact ones.

- "dropless" (sorted buckets) equals "capacity" in no-drop mode (capacity factor null, which is exact): block
  outputs and gradients, a small model's logits and every parameter gradient, left-padded batches included, and
  with a router that sends every token to the same experts (the last rung of the bucket ladder);
- "gather" (the decode path) equals "dropless" for 1..8 tokens;
- "auto" builds no ``[g, s, e, s]`` one-hot dispatch tensor in no-drop evaluation, and "capacity" still does;
- "dropless" on expert-sharded meshes of 8 fake devices gives the logits of one device.

Tolerance: float32, max |diff| <= 1e-5 x max |reference| per compared array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx
from mp_worker import fast_compile

from deepseekmoe_jax import partitioning, sharding
from deepseekmoe_jax.config import ConfigError
from deepseekmoe_jax.model import DeepseekForCausalLM
from deepseekmoe_jax.moe import MoEBlock, dispatch_mode, dropless_capacities

RTOL = 1e-5
FAST_COMPILE = fast_compile()

# name -> changes to the shared small config (see conftest.SMALL); moe_group_size 8 so that no-drop "capacity"
# runs several groups per sequence.
CASES = {
    "moe+shared": {},
    "no shared": dict(n_shared_experts=None),
    "norm_topk_prob top-3": dict(norm_topk_prob=True, num_experts_per_tok=3),
    "top-1 of 4": dict(n_routed_experts=4, num_experts_per_tok=1),
    "GQA, moe_layer_freq 2": dict(moe_layer_freq=2, first_k_dense_replace=0, num_key_value_heads=2),
}


def config_for(name, mode, **options):
    return small_config(**CASES[name], options={"moe_group_size": 8, "moe_dispatch": mode, **options})


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = max(float(np.abs(expected).max()), 1e-30)
    diff = float(np.abs(actual - expected).max())
    assert diff <= RTOL * scale, f"{what}: max |diff| {diff:.3g} vs max |ref| {scale:.3g}"


def left_pad_mask(b, t, pads):
    return (np.arange(t)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)  # [b, t]


# ----------------------------------------------------------------------------------------------- block level
def block_fn(config):
    """``(state, x, mask) -> (out, metrics, gradients of sum(out * probe) wrt (state, x))`` jitted."""
    graphdef, state = nnx.split(MoEBlock(config, rngs=nnx.Rngs(0)))
    probe = jax.random.normal(jax.random.key(7), (3, 12, config.hidden_size))

    def loss(state, x, mask):
        out = nnx.merge(graphdef, state)(x, mask)
        return jnp.sum(out.out * probe), out

    def run(state, x, mask):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x, mask)
        return out.out, out.metrics, grads

    return state, jax.jit(run)


@pytest.fixture(scope="module")
def block_inputs():
    x = jax.random.normal(jax.random.key(1), (3, 12, 32))
    return x, left_pad_mask(3, 12, (0, 3, 7))


def block_results(config, x, mask, state_edit=None):
    state, run = block_fn(config)
    if state_edit is not None:
        state = state_edit(state)
    out, metrics, (g_state, g_x) = run(state, x, mask)
    return out, metrics, nnx.to_flat_state(g_state), g_x


def assert_same_block(a, b, name):
    out_a, met_a, gs_a, gx_a = a
    out_b, met_b, gs_b, gx_b = b
    assert_close(out_a, out_b, f"{name}: output")
    assert_close(gx_a, gx_b, f"{name}: d/dx")
    assert float(met_a.dropped_fraction) == 0.0 == float(met_b.dropped_fraction)
    np.testing.assert_allclose(met_a.expert_load, met_b.expert_load, rtol=1e-6)
    for (path, ga), (_, gb) in zip(gs_a, gs_b, strict=True):
        assert_close(ga[...], gb[...], f"{name}: gradient of {'/'.join(map(str, path))}")


@pytest.mark.parametrize("name", ["moe+shared", "no shared", "norm_topk_prob top-3", "top-1 of 4"])
def test_dropless_block_equals_no_drop_capacity(block_inputs, name):
    x, mask = block_inputs
    expected = block_results(config_for(name, "capacity"), x, mask)
    assert_same_block(block_results(config_for(name, "dropless"), x, mask), expected, name)


def test_dropless_takes_the_last_rung_for_a_collapsed_router(block_inputs):
    """A zero router kernel: every softmax is uniform and the stable top-k picks experts 0 and 1 for every token,
    so expert 0 holds as many assignments as there are tokens: only the last (largest) bucket fits."""
    x, _ = block_inputs
    mask = np.ones(x.shape[:2], np.int32)

    def collapse(state):
        state["gate"]["kernel"][...] = jnp.zeros_like(state["gate"]["kernel"][...])
        return state

    expected = block_results(config_for("moe+shared", "capacity"), x, mask, collapse)
    actual = block_results(config_for("moe+shared", "dropless"), x, mask, collapse)
    n_real, k = int(mask.sum()), 2
    np.testing.assert_allclose(actual[1].expert_load[:2], 0.5)  # every real token on experts 0 and 1
    rungs = dropless_capacities(x.shape[0] * x.shape[1] * k, x.shape[0] * x.shape[1], 8)
    assert n_real > rungs[-2]  # no smaller bucket than the last one holds expert 0's assignments
    assert_same_block(actual, expected, "collapsed router")


def test_gather_equals_dropless_for_few_tokens():
    config = config_for("moe+shared", "dropless")
    graphdef, state = nnx.split(MoEBlock(config, rngs=nnx.Rngs(0)))
    gather_def = nnx.graphdef(MoEBlock(config.with_options(moe_dispatch="gather"), rngs=nnx.Rngs(0)))

    @jax.jit
    def both(state, x):
        return nnx.merge(graphdef, state)(x).out, nnx.merge(gather_def, state)(x)

    x_all = jax.random.normal(jax.random.key(3), (1, 8, config.hidden_size))
    for t in range(1, 9):
        dropless, gathered = both(state, x_all[:, :t])
        assert_close(gathered.out, dropless, f"{t} tokens")
        assert float(gathered.metrics.dropped_fraction) == 0.0
        np.testing.assert_allclose(gathered.metrics.expert_load.sum(), 1.0, rtol=1e-6)


def test_ladder():
    assert dropless_capacities(96, 48, 8) == (12, 15, 18, 24, 36, 48)  # N=96 assignments of 48 tokens, ceil(N/E)=12
    assert dropless_capacities(8, 1, 8) == (1,)
    for n_tok, k, e in [(5, 2, 8), (37, 6, 64), (4096, 6, 64)]:
        rungs = dropless_capacities(n_tok * k, n_tok, e)
        assert rungs[-1] == n_tok and rungs[0] == min(n_tok, -(-n_tok * k // e)) and list(rungs) == sorted(set(rungs))


def test_dispatch_option_and_auto_choice():
    with pytest.raises(ConfigError, match="moe_dispatch"):
        small_config(options={"moe_dispatch": "ragged"})
    config = small_config()  # 8 experts, top-2; capacity_factor_train 1.5, capacity_factor_eval null
    assert dispatch_mode(config, 64, training=True) == "capacity"
    assert dispatch_mode(config, 64, training=False) == "dropless"
    assert dispatch_mode(config, 3, training=False) == "gather"  # 3 * 2 < 8
    assert dispatch_mode(config, 4, training=False) == "dropless"
    nodrop_train = config.with_options(capacity_factor_train=None)
    assert dispatch_mode(nodrop_train, 64, training=True) == "dropless"
    assert dispatch_mode(config.with_options(capacity_factor_eval=2.0), 64, training=False) == "capacity"
    assert dispatch_mode(config.with_options(moe_dispatch="capacity"), 3, training=False) == "capacity"


# ----------------------------------------------------------------------------------------------- model level
def model_results(config, ids, mask):
    """Logits and every parameter gradient of ``sum(logits * probe)`` in evaluation mode (no-drop)."""
    graphdef, params, rest = nnx.split(DeepseekForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    probe = jax.random.normal(jax.random.key(5), (*ids.shape, config.vocab_size))

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(ids, mask).logits
        return jnp.sum(logits * probe), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, nnx.to_flat_state(grads)


@pytest.mark.parametrize("name", ["moe+shared", "GQA, moe_layer_freq 2"])
def test_dropless_model_equals_no_drop_capacity(name):
    config = config_for(name, "capacity")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (3, 12)).astype(np.int32)
    mask = left_pad_mask(3, 12, (0, 2, 5))
    logits_c, grads_c = model_results(config, ids, mask)
    logits_d, grads_d = model_results(config.with_options(moe_dispatch="dropless"), ids, mask)
    real = mask.astype(bool)
    assert_close(logits_d[real], logits_c[real], f"{name}: logits")
    assert len(grads_d) == len(grads_c) > 10
    for (path, gd), (_, gc) in zip(grads_d, grads_c, strict=True):
        assert_close(gd[...], gc[...], f"{name}: gradient of {'/'.join(map(str, path))}")


def avals(jaxpr):
    """Shapes of every value in a (closed) jaxpr and the jaxprs nested in its equations (scan, cond, remat...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        for v in (*eqn.invars, *eqn.outvars):
            if hasattr(v, "aval") and hasattr(v.aval, "shape"):
                yield tuple(v.aval.shape)
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    yield from avals(sub)


def test_auto_builds_no_one_hot_dispatch_in_no_drop_eval():
    # groups of 8 tokens, 2 sequences of 16: the no-drop capacity path builds dispatch [g=4, s=8, e=8, c=8].
    def shapes(mode, seq=16):
        config = small_config(options={"moe_group_size": 8, "moe_dispatch": mode})
        graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepseekForCausalLM(config, rngs=nnx.Rngs(0))))
        ids = jnp.zeros((2, seq), jnp.int32)
        return set(avals(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids).logits)(state)))

    one_hot = (4, 8, 8, 8)
    assert one_hot in shapes("capacity")  # the scan finds it where it exists
    auto = shapes("auto")
    assert one_hot not in auto
    assert not any(len(s) == 3 and s[:2] == (32, 8) for s in auto)  # no [b*t, e, c] one-hot either
    decode = shapes("auto", seq=1)  # 2 tokens x 2 choices < 8 experts: the gather path
    assert (2, 2, 32, 16) in decode  # w_gate / w_up gathered per (token, choice): [n, k, h, i]


# ----------------------------------------------------------------------------------------------- expert meshes
@pytest.fixture(scope="module")
def mesh_logits():
    config = small_config(num_hidden_layers=2, first_k_dense_replace=0, options={"moe_group_size": 8})
    config = config.with_options(moe_dispatch="dropless")
    rules = partitioning.rules_for(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 16)).astype(np.int32)

    def run(mesh):
        model = sharding.create_sharded_model(config, mesh, seed=3, compiler_options=FAST_COMPILE)
        graphdef, state = nnx.split(model)
        step = sharding.jit_step(
            lambda state, batch: nnx.merge(graphdef, state)(batch).logits,
            mesh,
            sharding.param_shardings(state, rules, mesh),
            rules=rules,
            out_shardings=sharding.replicated(mesh),
            compiler_options=FAST_COMPILE,
        )
        batch = sharding.shard_batch(ids, mesh, rules)
        return np.asarray(step(state, batch)), step.lower(state, batch).compile().as_text()

    cache = {}

    def get(mesh):
        key = tuple(mesh.shape.items())
        if key not in cache:
            cache[key] = run(mesh)
        return cache[key]

    return get


@pytest.mark.parametrize("mesh_sizes", [dict(expert=8), dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)])
def test_dropless_on_expert_meshes_equals_one_device(mesh_logits, mesh_sizes):
    expected, _ = mesh_logits(sharding.make_mesh(devices=jax.devices()[:1]))
    actual, hlo = mesh_logits(sharding.make_mesh(**mesh_sizes))
    assert_close(actual, expected, f"logits on {mesh_sizes}")
    assert np.isfinite(actual).all()
    assert "all-gather" in hlo or "all-to-all" in hlo or "all-reduce" in hlo  # it really ran partitioned
