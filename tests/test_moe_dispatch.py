"""Properties of the capacity-bucketed einsum dispatch, checked against plain per-token evaluation in numpy.

- no-drop mode equals evaluating each token's chosen experts directly;
- with capacity, every kept assignment is computed exactly and every dropped one contributes zero, where "kept" is
  recomputed here by an independent first-come-first-served slot count;
- no expert slot holds more than one token, no expert receives more than C tokens per group;
- dropping is causal: changing future tokens never changes an earlier token's output (block and full model).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import small_config
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseekmoe_jax import DeepseekForCausalLM
from deepseekmoe_jax.config import capacity
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.moe import MoEBlock, dispatch_tensors, route

E, K, H, WIDTH = 8, 2, 16, 8
# Weights of order one (not the training init's 0.006), so that routed outputs are far above the tolerances and a
# wrong, missing or wrongly dropped assignment shows.
INIT_STD = 0.3
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _config(group_size, capacity_factor, n_shared=1, norm=False):
    return small_config(
        hidden_size=H,
        num_attention_heads=2,
        n_routed_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=WIDTH,
        n_shared_experts=n_shared,
        norm_topk_prob=norm,
        options={
            "moe_group_size": group_size,
            "capacity_factor_train": capacity_factor,
            "min_capacity": 1,
            "init_std": INIT_STD,
        },
    )


@functools.cache
def _block(group_size, capacity_factor):
    block = MoEBlock(_config(group_size, capacity_factor), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    run = jax.jit(lambda state, x, mask: nnx.merge(graphdef, state)(x, mask, training=True))
    return block, state, run


def _np_params(block):
    p = {
        "gate": np.asarray(block.gate.kernel[...]),
        "wg": np.asarray(block.experts.w_gate[...]),
        "wu": np.asarray(block.experts.w_up[...]),
        "wd": np.asarray(block.experts.w_down[...]),
    }
    if block.shared_experts is not None:
        s = block.shared_experts
        p["shared"] = (np.asarray(s.gate_proj[...]), np.asarray(s.up_proj[...]), np.asarray(s.down_proj[...]))
    return p


def _swiglu(x, wg, wu, wd):
    g = x @ wg
    return ((g / (1 + np.exp(-g))) * (x @ wu)) @ wd


def _expected(p, x, mask, group, cap):
    """Token-by-token evaluation with first-come-first-served slots per (group, expert)."""
    b, t, _ = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    x64 = x.astype(np.float64)
    for i in range(b):
        used = {}
        for s in range(t):
            logits = x64[i, s] @ p["gate"]
            scores = np.exp(logits - logits.max())
            scores /= scores.sum()
            chosen = np.argsort(-scores, kind="stable")[:K]
            y = np.zeros(H)
            if mask[i, s]:
                g = s // group
                for e in chosen:
                    n = used.get((g, e), 0)
                    if n < cap:
                        used[(g, e)] = n + 1
                        y += scores[e] * _swiglu(x64[i, s], p["wg"][e], p["wu"][e], p["wd"][e])
            if "shared" in p:
                y += _swiglu(x64[i, s], *p["shared"])
            out[i, s] = y
    return out


@SETTINGS
@given(seed=st.integers(0, 2**16), pad=st.integers(0, 5))
def test_no_drop_equals_per_token_evaluation(seed, pad):
    block, state, run = _block(8, None)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 12, H)).astype(np.float32)
    mask = np.ones((2, 12), bool)
    mask[1, :pad] = False
    out = run(state, jnp.asarray(x), jnp.asarray(mask))
    params = _np_params(block)
    expected = _expected(params, x, mask, group=8, cap=8)
    np.testing.assert_allclose(np.asarray(out.out)[mask], expected[mask], rtol=1e-4, atol=1e-5)
    assert float(out.metrics.dropped_fraction) == 0.0
    # The routed experts carry much of the output: dropping them all would fail the comparison above.
    shared_only = _expected(params, x, mask, group=8, cap=0)
    assert np.abs(expected - shared_only)[mask].max() > 100 * 1e-4 * np.abs(expected).max()


@SETTINGS
@given(seed=st.integers(0, 2**16), cf=st.sampled_from([0.5, 1.0]), spread=st.floats(0.5, 4.0))
def test_capacity_keeps_first_come_and_drops_the_rest(seed, cf, spread):
    block, state, run = _block(6, cf)
    cap = capacity(6, K, E, cf, 1)
    rng = np.random.default_rng(seed)
    # Low-spread inputs concentrate the router on few experts, so capacity binds often.
    x = (spread * rng.normal(size=(3, 12, H))).astype(np.float32)
    mask = np.ones((3, 12), bool)
    out = run(state, jnp.asarray(x), jnp.asarray(mask))
    params = _np_params(block)
    expected = _expected(params, x, mask, group=6, cap=cap)
    np.testing.assert_allclose(np.asarray(out.out), expected, rtol=1e-4, atol=1e-5)
    # Whenever an assignment was dropped, keeping it would have changed the output well beyond the tolerance, so
    # the comparison above tells kept from dropped assignments.
    if float(out.metrics.dropped_fraction) > 0:
        no_drop = _expected(params, x, mask, group=6, cap=6)
        assert np.abs(no_drop - expected).max() > 100 * (1e-5 + 1e-4 * np.abs(expected).max())


@functools.cache
def _plan(k, cap):
    def plan(logits, valid):
        routing = route(logits, k, False)
        return routing, dispatch_tensors(routing.indices, routing.weights, valid, E, cap)

    return jax.jit(plan)


@SETTINGS
@given(seed=st.integers(0, 2**16), cap=st.sampled_from([1, 2, 3, 9]), k=st.sampled_from([1, 3]))
def test_slots_are_never_overfilled(seed, cap, k):
    groups, group = 2, 9
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(groups, group, E)) * rng.uniform(0.1, 5.0))
    valid = jnp.asarray(rng.uniform(size=(groups, group)) < 0.9)
    routing, (dispatch, combine, assigned, kept) = _plan(k, cap)(logits, valid)
    dispatch = np.asarray(dispatch)
    assert dispatch.sum(axis=1).max(initial=0) <= 1  # a slot holds at most one token
    assert dispatch.sum(axis=(1, 3)).max(initial=0) <= cap  # an expert takes at most C tokens per group
    assert np.array_equal(dispatch.sum(axis=3) > 0, np.asarray(kept))  # a kept assignment has exactly one slot
    assert dispatch.sum(axis=3).max(initial=0) <= 1
    assert not np.asarray(assigned)[~np.asarray(valid)].any()  # padding never takes a slot
    # kept = assigned until the expert's C slots are used up, in token order
    a, kept_np = np.asarray(assigned), np.asarray(kept)
    for g in range(groups):
        for e in range(E):
            order = np.flatnonzero(a[g, :, e])
            assert np.array_equal(np.flatnonzero(kept_np[g, :, e]), order[:cap])
    # the combine weights are the gate weights of the kept assignments
    gate = np.zeros((groups, group, E), np.float32)
    np.put_along_axis(gate, np.asarray(routing.indices), np.asarray(routing.weights), axis=-1)
    np.testing.assert_allclose(np.asarray(combine).sum(-1), gate * kept_np, rtol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 2**16), cut=st.integers(1, 11))
def test_future_tokens_never_change_earlier_outputs_block(seed, cut):
    block, state, run = _block(12, 0.5)  # one group per sequence and tight capacity: drops happen
    rng = np.random.default_rng(seed)
    x = (0.7 * rng.normal(size=(2, 12, H))).astype(np.float32)
    y = x.copy()
    y[:, cut:] = rng.normal(size=y[:, cut:].shape)
    mask = jnp.ones((2, 12), bool)
    out_x, out_y = run(state, jnp.asarray(x), mask), run(state, jnp.asarray(y), mask)
    np.testing.assert_array_equal(np.asarray(out_x.out)[:, :cut], np.asarray(out_y.out)[:, :cut])


@functools.cache
def _lm():
    config = small_config(options={"moe_group_size": 16, "capacity_factor_train": 0.5, "min_capacity": 1})
    model = DeepseekForCausalLM(config, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids, training=True))
    return config, state, run


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), cut=st.integers(1, 15))
def test_future_tokens_never_change_earlier_logits_model(seed, cut):
    config, state, run = _lm()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (2, 16))
    other = ids.copy()
    other[:, cut:] = rng.integers(0, config.vocab_size, other[:, cut:].shape)
    a, b = run(state, jnp.asarray(ids)), run(state, jnp.asarray(other))
    np.testing.assert_array_equal(np.asarray(a.logits)[:, :cut], np.asarray(b.logits)[:, :cut])


def test_capacity_actually_drops_and_no_drop_is_exact():
    """The causality test above is only meaningful if its setting drops assignments; and eval (no-drop) mode must
    agree with a capacity so large that nothing can drop."""
    config, state, run = _lm()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)))
    assert float(run(state, ids).moe_metrics.dropped_fraction.max()) > 0
    graphdef = nnx.graphdef(abstract_model(config, seed=1))
    eval_out = nnx.merge(graphdef, state)(ids, training=False)
    assert float(eval_out.moe_metrics.dropped_fraction.max()) == 0.0
    big = config.with_options(capacity_factor_train=float(E) / K)
    big_graphdef = nnx.graphdef(abstract_model(big, seed=1))
    train_big = nnx.merge(big_graphdef, state)(ids, training=True)
    np.testing.assert_allclose(np.asarray(train_big.logits), np.asarray(eval_out.logits), rtol=1e-5, atol=1e-5)
