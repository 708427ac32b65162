"""Balance losses: values and gradients against the spec's formulas written in PyTorch (tests/torch_spec.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import small_config
from flax import nnx
from torch_spec import spec_device_loss, spec_expert_loss, spec_gate

from deepseekmoe_jax.moe import MoEBlock, device_balance_loss, expert_balance_loss, route

B, T, H, E, K = 3, 10, 16, 8, 3


def _inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, H)).astype(np.float32)
    w = (0.5 * rng.normal(size=(E, H))).astype(np.float32)  # torch layout [E, H]
    return x, w


def _jax_loss(kind, seq_aux, alpha, groups=2):
    def loss(w_he, x):
        routing = route(jnp.einsum("bth,he->bte", x, w_he), K, False)
        if kind == "expert":
            return expert_balance_loss(routing.scores, routing.indices, alpha, seq_aux)
        return device_balance_loss(routing.scores, routing.indices, alpha, groups)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _torch_loss(kind, seq_aux, alpha, x, w, groups=2):
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    scores, _, indices = spec_gate(xt.reshape(-1, H), wt, K, False)
    scores, indices = scores.reshape(B, T, E), indices.reshape(B, T, K)
    if kind == "expert":
        value = spec_expert_loss(scores, indices, alpha, seq_aux)
    else:
        value = spec_device_loss(scores, indices, alpha, groups)
    value.backward()
    return float(value.detach()), wt.grad.numpy().T, xt.grad.numpy()


@pytest.mark.parametrize("kind, seq_aux", [("expert", True), ("expert", False), ("device", None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_loss_value_and_gradients(kind, seq_aux, seed):
    x, w = _inputs(seed)
    alpha = 0.01 if kind == "expert" else 0.05
    (value, (grad_w, grad_x)) = _jax_loss(kind, seq_aux, alpha)(jnp.asarray(w.T), jnp.asarray(x))
    ref_value, ref_grad_w, ref_grad_x = _torch_loss(kind, seq_aux, alpha, x, w)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_w), ref_grad_w, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(grad_x), ref_grad_x, rtol=1e-5, atol=1e-9)
    assert np.abs(ref_grad_w).max() > 0  # the loss does reach the gate


def test_uniform_router_gives_alpha():
    """With a perfectly balanced router every variant equals alpha (f_i = 1, P_i = 1/N)."""
    scores = jnp.full((2, 8, E), 1.0 / E)
    indices = jnp.tile(jnp.arange(E).reshape(1, 8, 1) % E, (2, 1, 1)).astype(jnp.int32)  # each expert once
    assert np.isclose(float(expert_balance_loss(scores, indices, 0.01, True)), 0.01)
    assert np.isclose(float(expert_balance_loss(scores, indices, 0.01, False)), 0.01)
    assert np.isclose(float(device_balance_loss(scores, indices, 0.05, 4)), 0.05)


def test_block_reports_aux_only_in_training_and_sums_variants():
    config = small_config(
        hidden_size=H,
        num_attention_heads=2,
        n_routed_experts=E,
        num_experts_per_tok=K,
        aux_loss_alpha=0.01,
        options={"device_balance_alpha": 0.05, "device_balance_groups": 2, "capacity_factor_train": 1.0},
    )
    block = MoEBlock(config, rngs=nnx.Rngs(0))
    x, _ = _inputs(7)
    x = jnp.asarray(x)
    routing = block.gate(x)
    expected = expert_balance_loss(routing.scores, routing.indices, 0.01, True) + device_balance_loss(
        routing.scores, routing.indices, 0.05, 2
    )
    assert np.isclose(float(block(x, training=True).aux_loss), float(expected), rtol=1e-6)
    assert float(block(x, training=False).aux_loss) == 0.0
    # The aux loss is computed from the greedy top-k before dropping: independent of the capacity factor.
    tight = MoEBlock(config.with_options(capacity_factor_train=0.25, min_capacity=1), rngs=nnx.Rngs(0))
    out = tight(x, training=True)
    assert float(out.metrics.dropped_fraction) > 0
    assert np.isclose(float(out.aux_loss), float(expected), rtol=1e-6)
