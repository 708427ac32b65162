"""Full-size presets checked abstractly (`jax.eval_shape`: no parameter memory is allocated), and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, small_config
from flax import nnx

from deepseekmoe_jax import DeepseekConfig, DeepseekForCausalLM, param_count
from deepseekmoe_jax.hf_weights import hf_key_shapes
from deepseekmoe_jax.model import abstract_model

PRESETS = {
    "deepseekmoe-16b.yaml": 16_375_728_128,  # the spec's count for deepseek-moe-16b
    "deepseekmoe-145b.yaml": 144_482_226_176,  # paper: 144.6B (expert width not given there)
    "deepseekmoe-2b.yaml": 2_062_512_640,  # paper: 2.0B
}


@pytest.mark.parametrize("name, expected", list(PRESETS.items()))
def test_preset_parameter_counts(name, expected):
    config = DeepseekConfig.from_file(ROOT / "configs" / name)
    model = abstract_model(config)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    assert param_count(model) == expected
    # The HF checkpoint layout holds exactly the same number of parameters.
    assert sum(int(np.prod(s)) for s in hf_key_shapes(config).values()) == expected


def test_16b_forward_shapes_abstractly():
    config = DeepseekConfig.from_file(ROOT / "configs" / "deepseekmoe-16b.yaml")
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    out = jax.eval_shape(lambda s, i: nnx.merge(graphdef, s)(i, training=True), state, ids)
    assert out.logits.shape == (2, 256, 102400) and out.logits.dtype == jnp.float32
    assert out.aux_loss.shape == () and out.moe_metrics.expert_load.shape == (27, 64)
    w = model.model.segments[1].layers[0].mlp.experts.w_gate
    assert w.shape == (27, 64, 2048, 1408)  # [layers, experts, hidden, expert width]


def _logits(model, ids):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits)(state, ids)


@pytest.mark.parametrize("param_dtype, dtype", [("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_reduced_precision_stays_close_to_float32(param_dtype, dtype):
    base = small_config()
    f32 = DeepseekForCausalLM(base, rngs=nnx.Rngs(0))
    low = nnx.merge(
        nnx.graphdef(abstract_model(base.with_options(param_dtype=param_dtype, dtype=dtype))),
        jax.tree.map(lambda a: a.astype(param_dtype), nnx.state(f32)),
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(0, base.vocab_size, (2, 16)))
    ref, out = _logits(f32, ids), _logits(low, ids)
    assert out.dtype == jnp.float32
    assert jax.tree.leaves(nnx.state(low, nnx.Param))[0].dtype == jnp.dtype(param_dtype)
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < 3e-2  # bf16 rounding is visible but small


def test_traced_program_does_not_grow_with_depth():
    """Layers of one kind run under one scan: 4 and 12 layers trace to programs of the same size."""

    def n_equations(layers):
        config = small_config(num_hidden_layers=layers)
        graphdef, state = nnx.split(abstract_model(config))
        ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i).logits)(state, ids)
        return len(jaxpr.jaxpr.eqns)

    assert n_equations(4) == n_equations(12)
    unrolled = small_config(num_hidden_layers=12, options={"scan_layers": False})
    graphdef, state = nnx.split(abstract_model(unrolled))
    jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i).logits)(
        state, jax.ShapeDtypeStruct((1, 8), jnp.int32)
    )
    assert len(jaxpr.jaxpr.eqns) > n_equations(12)  # the unrolled variant does grow (sanity check of the measure)


def test_gate_and_norm_statistics_are_float32_under_bfloat16():
    """With bfloat16 parameters and compute, the router's logits and softmax and RMSNorm's statistics are still
    float32: they equal a float64 evaluation of the same bfloat16 numbers to float32 accuracy, which bfloat16
    arithmetic (8 bits of mantissa) would miss by orders of magnitude."""
    from deepseekmoe_jax.layers import RMSNorm
    from deepseekmoe_jax.moe import MoEGate

    config = small_config(options={"param_dtype": "bfloat16", "dtype": "bfloat16", "init_std": 0.3})
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, config.hidden_size)) * 3.0, jnp.bfloat16)
    gate = MoEGate(config, rngs=nnx.Rngs(0))
    assert gate.kernel[...].dtype == jnp.bfloat16
    routing = gate(x)
    assert routing.weights.dtype == jnp.float32
    logits = np.asarray(x, np.float64) @ np.asarray(gate.kernel[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.take_along_axis(probs, np.asarray(routing.indices), axis=-1)
    np.testing.assert_allclose(np.asarray(routing.weights), want, rtol=2e-5, atol=1e-7)

    norm = RMSNorm(config.hidden_size, 1e-6, param_dtype=jnp.bfloat16)
    norm.weight[...] = jnp.asarray(1 + 0.1 * rng.normal(size=config.hidden_size), jnp.bfloat16)
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    normed = (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
    want = (np.asarray(norm.weight[...], np.float64) * np.asarray(normed, np.float64)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_train_and_eval_modes():
    """``model.train()`` switches on training mode (balance loss, training capacity factor), ``model.eval()`` back
    to the exact no-drop evaluation; ``training=`` overrides either for one call."""
    config = small_config(options={"capacity_factor_train": 0.5, "min_capacity": 1})
    model = DeepseekForCausalLM(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)))

    def run(**kwargs):
        out = model(ids, **kwargs)
        return float(out.aux_loss), float(jnp.mean(out.moe_metrics.dropped_fraction))

    assert run() == (0.0, 0.0)  # a new model evaluates
    model.train()
    aux, dropped = run()
    assert aux > 0 and dropped > 0
    assert run(training=False) == (0.0, 0.0)
    model.eval()
    assert run() == (0.0, 0.0)
    assert run(training=True) == (aux, dropped)
