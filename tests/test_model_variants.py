"""Execution variants that must not change the numbers: rematerialisation policies and unrolled layers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx

from deepseekmoe_jax import DeepseekForCausalLM
from deepseekmoe_jax.config import REMAT_POLICIES
from deepseekmoe_jax.model import abstract_model


def _loss_fn(config, ids):
    graphdef = nnx.graphdef(abstract_model(config))

    def loss(state):
        out = nnx.merge(graphdef, state)(ids[:, :-1], training=True)
        logp = jax.nn.log_softmax(out.logits)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
        return nll + out.aux_loss

    return loss


def _loss_and_grads(config, state, ids):
    return jax.jit(jax.value_and_grad(_loss_fn(config, ids)))(state)


def _has_remat(config, state, ids):
    jaxpr = jax.make_jaxpr(_loss_fn(config, ids))(state)
    return "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)


@pytest.fixture(scope="module")
def setup():
    config = small_config(options={"capacity_factor_train": 1.0, "moe_group_size": 8})
    state = nnx.state(DeepseekForCausalLM(config, rngs=nnx.Rngs(2)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 17)))
    return config, state, ids, _loss_and_grads(config, state, ids)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_give_the_same_gradients(setup, policy):
    config, state, ids, (ref_loss, ref_grads) = setup
    remat = config.with_options(remat_policy=policy)
    assert _has_remat(remat, state, ids) and not _has_remat(config, state, ids)
    loss, grads = _loss_and_grads(remat, state, ids)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)


def test_unrolled_layers_equal_scanned_layers(setup):
    config, state, ids, (ref_loss, ref_grads) = setup
    loss, grads = _loss_and_grads(config.with_options(scan_layers=False), state, ids)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
