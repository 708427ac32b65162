"""An independent PyTorch reference of DeepSeekMoE v1 assembled from `transformers` parts (needs the ``test`` extra).

`transformers` has no ``deepseek`` (v1) model class, but its parts compute the same math: the dense parts are
Llama layers (attention, RMSNorm, SwiGLU MLP, rotary with linear/dynamic scaling) and an MoE block is
``DeepseekV2Moe`` with greedy routing, ``routed_scaling_factor=1`` and one group. `build_reference` assembles a
``LlamaForCausalLM`` whose MoE layers' MLPs are replaced by ``DeepseekV2Moe``; `reference_state_dict` returns its
weights in the v1 checkpoint layout (fused expert tensors split back into per-expert keys), which is exactly what
a ``deepseek-moe-16b`` checkpoint holds. `load_reference_state_dict` does the opposite.

Known differences from the v1 remote code (the reason tests use float32): ``DeepseekV2Moe`` computes the gate in
float32 and has no auxiliary loss. ``DeepseekV2Moe`` never renormalises its top-k weights; for a config with
``norm_topk_prob`` (and k > 1) `build_reference` adds that step to every MoE gate (a forward hook, no extra
weights), as the v1 spec writes it: ``w / (sum(w) + 1e-20)``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.hf_weights import model_from_hf_state_dict


def _rope_parameters(config: DeepseekConfig) -> dict:
    if config.rope_type is None:
        return {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    return {"rope_type": config.rope_type, "factor": float(config.rope_factor), "rope_theta": float(config.rope_theta)}


def reference_moe_config(config: DeepseekConfig, experts_implementation: str = "eager"):
    """The `transformers` ``DeepseekV2Config`` whose ``DeepseekV2Moe`` computes the v1 MoE block of ``config``
    (softmax gate, greedy top-k, no top-k renormalisation, no routed scaling); ``experts_implementation`` is
    transformers' choice of expert kernel ("eager": the plain per-expert loop, or "grouped_mm")."""
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config

    moe_cfg = DeepseekV2Config(
        hidden_size=config.hidden_size,
        n_routed_experts=config.n_routed_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size,
        n_shared_experts=config.n_shared_experts or 0,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        hidden_act="silu",
        mlp_bias=False,
    )
    moe_cfg._experts_implementation = experts_implementation
    return moe_cfg


def build_reference(config: DeepseekConfig, *, seed: int = 0, std: float = 0.02, dtype=None):
    """A random-weight PyTorch model computing DeepSeekMoE v1 for ``config`` (eval mode, eager attention).

    Every weight is drawn from N(0, std) (norm weights from 1 + N(0, 0.1)) so that no parameter is trivially 1 or 0.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    c = config
    dtype = dtype or torch.float32
    llama = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=_rope_parameters(c),
        attention_bias=c.attention_bias,
        mlp_bias=False,
        tie_word_embeddings=c.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    llama._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama)
    if c.is_moe:
        moe_cfg = reference_moe_config(c, "eager")
        for i in range(c.num_hidden_layers):
            if c.is_moe_layer(i):
                with warnings.catch_warnings():  # a zero-width shared MLP (no shared experts) warns at init
                    warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                    model.model.layers[i].mlp = DeepseekV2Moe(moe_cfg)
                if c.norm_topk_prob and c.num_experts_per_tok > 1:
                    model.model.layers[i].mlp.gate.register_forward_hook(_renormalise_top_k)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def _renormalise_top_k(_module, _inputs, output):
    """Forward hook on a ``DeepseekV2TopkRouter``: its top-k weights divided by their sum (+ 1e-20), the v1
    ``norm_topk_prob`` step (``routed_scaling_factor`` is 1, so scaling before or after makes no difference)."""
    router_logits, weights, indices = output
    return router_logits, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), indices


def reference_state_dict(model, config: DeepseekConfig) -> dict:
    """The reference model's weights as a v1 checkpoint state dict (torch tensors, per-expert keys)."""
    out = {}
    i_width = config.moe_intermediate_size
    for key, value in model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and key == "lm_head.weight"):
            continue
        if key.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H], gate rows first
            prefix = key[: -len("gate_up_proj")]
            for j in range(value.shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = value[j, :i_width].clone()
                out[f"{prefix}{j}.up_proj.weight"] = value[j, i_width:].clone()
        elif key.endswith("mlp.experts.down_proj"):  # [E, H, I]
            prefix = key[: -len("down_proj")]
            for j in range(value.shape[0]):
                out[f"{prefix}{j}.down_proj.weight"] = value[j].clone()
        elif ".mlp.shared_experts." in key and config.shared_intermediate_size == 0:
            continue  # a zero-width shared MLP stands for "no shared experts"
        else:
            out[key] = value.clone()
    return dict(sorted(out.items(), key=lambda kv: _key_order(kv[0])))


def _key_order(key: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if key.startswith("model.embed") else 2, 0, key)


def load_reference_state_dict(model, state_dict: Mapping, config: DeepseekConfig) -> None:
    """Load a v1-layout state dict (torch tensors or numpy arrays) into a `build_reference` model."""
    import torch

    def tensor(v):
        return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, dtype=np.float32))

    fused: dict[str, dict] = {}
    plain = {}
    for key, v in state_dict.items():
        if ".mlp.experts." in key:
            prefix, rest = key.split(".mlp.experts.")
            j, proj = rest.split(".")[0], rest.split(".")[1]
            fused.setdefault(prefix, {})[(int(j), proj)] = tensor(v)
        else:
            plain[key] = tensor(v)
    e = config.n_routed_experts or 0
    for prefix, parts in fused.items():
        plain[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(j, "gate_proj")], parts[(j, "up_proj")]], 0) for j in range(e)]
        )
        plain[f"{prefix}.mlp.experts.down_proj"] = torch.stack([parts[(j, "down_proj")] for j in range(e)])
    own = model.state_dict()
    for key in own:
        if key not in plain and ".mlp.shared_experts." in key and config.shared_intermediate_size == 0:
            plain[key] = own[key]
        if key == "lm_head.weight" and config.tie_word_embeddings:
            plain[key] = plain["model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in plain.items() if k in own}, strict=True)


def reference_logits(
    model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None
) -> np.ndarray:
    """float32 logits [B, T, V] of the reference model (``position_ids`` [B, T]: default ``0..T-1``)."""
    import torch

    def tensor(a):
        return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.int64))

    with torch.no_grad():
        out = model(
            input_ids=tensor(input_ids),
            attention_mask=tensor(attention_mask),
            position_ids=tensor(position_ids),
            use_cache=False,
        )
    return out.logits.float().numpy()


def relative_max_diff(ref: np.ndarray, out: np.ndarray, mask: np.ndarray | None = None) -> float:
    """max |ref - out| / max |ref| over real (unmasked) positions of [B, T, V] logits."""
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        ref, out = ref[keep], out[keep]
    return float(np.abs(ref - out).max() / np.abs(ref).max())


def compare_with_reference(
    config: DeepseekConfig, seeds=(0,), *, batch: int = 2, seq: int = 24, left_pad: int = 0
) -> list[float]:
    """Logit parity of `DeepseekForCausalLM` against `build_reference`, one value per seed.

    For each seed: random reference weights are loaded into the JAX model through the HF key table, random token
    ids (and, with ``left_pad``, a batch whose second row starts with that many padding positions) go through both,
    and the relative max difference over real positions is returned. The JAX forward is compiled once per config.
    """
    forward = None
    diffs = []
    for seed in seeds:
        ref = build_reference(config, seed=seed)
        model = model_from_hf_state_dict(config, reference_state_dict(ref, config))
        if forward is None:
            forward = jax.jit(lambda state, ids, mask, g=nnx.graphdef(model): nnx.merge(g, state)(ids, mask).logits)
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, config.vocab_size, (batch, seq))
        mask = np.ones((batch, seq), np.int32)
        if left_pad:
            mask[-1, :left_pad] = 0
        expected = reference_logits(ref, ids, mask if left_pad else None)
        got = np.asarray(forward(nnx.state(model), jnp.asarray(ids), jnp.asarray(mask) if left_pad else None))
        diffs.append(relative_max_diff(expected, got, mask if left_pad else None))
    return diffs
