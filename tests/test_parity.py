"""Logit parity with the independent PyTorch reference (transformers' Llama layers + DeepseekV2Moe), float32.

Tolerance: max |diff| <= 1e-4 x max |logit| in the exact no-drop mode (evaluation default).
"""

import jax
import numpy as np
import pytest
import torch
from conftest import jit_forward, small_config
from flax import nnx
from torch_spec import SpecMoE, spec_expert_loss

from deepseekmoe_jax.hf_weights import model_from_hf_state_dict
from deepseekmoe_jax.model import moe_layer_indices
from deepseekmoe_jax.reference import (
    build_reference,
    compare_with_reference,
    reference_logits,
    reference_state_dict,
    relative_max_diff,
)

TOL = 1e-4

# name -> changes to the shared small config (see conftest.SMALL)
CASES = {
    "dense-only": dict(n_routed_experts=None, num_experts_per_tok=None),
    "moe+shared": {},
    "moe, no shared": dict(n_shared_experts=None),
    "moe_layer_freq 2 + GQA": dict(
        moe_layer_freq=2, first_k_dense_replace=0, num_hidden_layers=5, num_key_value_heads=2
    ),
    "MQA (1 kv head)": dict(num_key_value_heads=1),
    "rope linear x2": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope dynamic x3 (seq > max_pos)": dict(
        rope_scaling={"type": "dynamic", "factor": 3.0}, max_position_embeddings=16
    ),
    "attention bias + tied head": dict(attention_bias=True, tie_word_embeddings=True),
    "top-1 of 4": dict(n_routed_experts=4, num_experts_per_tok=1),
    "norm_topk_prob (top-3)": dict(norm_topk_prob=True, num_experts_per_tok=3),
}
SEEDS = (0, 1, 2)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name):
    config = small_config(**CASES[name])
    diffs = compare_with_reference(config, SEEDS, left_pad=0)
    assert max(diffs) <= TOL, diffs
    # Left-padded batch: outputs at real positions still agree (padding takes no expert slots, is never attended).
    padded = compare_with_reference(config, SEEDS[:1], left_pad=5)
    assert max(padded) <= TOL, padded


def test_dynamic_rope_below_and_above_the_limit():
    config = small_config(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    assert max(compare_with_reference(config, (3,), seq=12)) <= TOL  # below max_position_embeddings: unscaled
    assert max(compare_with_reference(config, (3,), seq=40)) <= TOL  # above: NTK-scaled base


@pytest.mark.parametrize("rope", ["plain", "linear"])
def test_explicit_positions_match_reference(rope):
    """``positions=`` (a continuation of an earlier prefix; positions restarting mid-row) gives the reference's
    logits for the same ``position_ids``, and differs from the default positions. Positions only move the rotary
    phases, attention stays causal over the whole row, as in the v1 modeling code; the explicit all-ones mask keeps
    transformers from reading restarts as packed documents."""
    config = small_config(rope_scaling={"type": "linear", "factor": 2.0} if rope == "linear" else None)
    ref = build_reference(config, seed=5)
    model = model_from_hf_state_dict(config, reference_state_dict(ref, config))
    ids = np.random.default_rng(5).integers(0, config.vocab_size, (2, 10))
    positions = np.stack([np.arange(10) + 7, np.r_[np.arange(4), np.arange(6)]]).astype(np.int32)
    expected = reference_logits(ref, ids, np.ones_like(ids), position_ids=positions)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, None, p).logits)
    got = np.asarray(forward(state, ids, positions))
    assert relative_max_diff(expected, got) <= TOL
    default = np.asarray(forward(state, ids, np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))))
    assert relative_max_diff(expected, default) > 10 * TOL


def _spec_reference(config, seed):
    """The transformers reference with each MoE block replaced by the spec's block (SpecMoE)."""
    ref = build_reference(config.replace(norm_topk_prob=False), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for i in moe_layer_indices(config):
        block = SpecMoE(
            config.hidden_size,
            config.n_routed_experts,
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            config.n_shared_experts,
            config.norm_topk_prob,
        )
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        ref.model.layers[i].mlp = block
    return ref


def _spec_state_dict(ref, config):
    sd = {
        k: v
        for k, v in ref.state_dict().items()
        if ".mlp." not in k or k.split(".")[2] not in {str(i) for i in moe_layer_indices(config)}
    }
    for i in moe_layer_indices(config):
        sd.update(ref.model.layers[i].mlp.v1_state_dict(f"model.layers.{i}.mlp."))
    return sd


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_norm_topk_prob_against_spec_block(norm_topk_prob):
    """The spec's own block (written from its formulas, independent of the reference's renormalising hook)."""
    import jax.numpy as jnp

    config = small_config(norm_topk_prob=norm_topk_prob, num_experts_per_tok=3)
    ref = _spec_reference(config, seed=4)
    model = model_from_hf_state_dict(config, _spec_state_dict(ref, config))
    ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, 8))
    diff = relative_max_diff(reference_logits(ref, ids), np.asarray(jit_forward(model, jnp.asarray(ids)).logits))
    assert diff <= TOL


def test_summed_aux_loss_and_expert_load_match_spec():
    """Training-mode aux loss = sum over MoE layers of the spec's formula evaluated on each layer's own input, and
    the reported per-layer expert load is that layer's routing histogram, in layer order (also across segments)."""
    import jax.numpy as jnp

    layouts = {True: {}, False: dict(moe_layer_freq=2, first_k_dense_replace=0, num_hidden_layers=5)}
    for seq_aux, layout in layouts.items():
        config = small_config(seq_aux=seq_aux, aux_loss_alpha=0.01, options={"capacity_factor_train": None}, **layout)
        ref = _spec_reference(config, seed=5)
        model = model_from_hf_state_dict(config, _spec_state_dict(ref, config))
        ids = np.random.default_rng(5).integers(0, config.vocab_size, (2, 8))
        reference_logits(ref, ids)  # records each SpecMoE's routing
        routings = [ref.model.layers[i].mlp.last_routing for i in moe_layer_indices(config)]
        expected = sum(float(spec_expert_loss(scores, idx, 0.01, seq_aux)) for scores, idx in routings)
        out = jit_forward(model, jnp.asarray(ids), training=True)
        assert abs(float(out.aux_loss) - expected) <= 1e-6 * max(1.0, abs(expected))
        assert float(jit_forward(model, jnp.asarray(ids), training=False).aux_loss) == 0.0
        loads = np.stack(
            [np.bincount(idx.reshape(-1).numpy(), minlength=config.n_routed_experts) for _, idx in routings]
        )
        np.testing.assert_allclose(
            np.asarray(out.moe_metrics.expert_load), loads / loads.sum(1, keepdims=True), atol=1e-7
        )


def test_reference_state_dict_is_the_v1_layout():
    config = small_config()
    sd = reference_state_dict(build_reference(config), config)
    from deepseekmoe_jax.hf_weights import hf_key_shapes

    shapes = hf_key_shapes(config)
    assert set(sd) == set(shapes)
    assert all(tuple(sd[k].shape) == shapes[k] for k in sd)
