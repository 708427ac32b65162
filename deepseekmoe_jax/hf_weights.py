"""The HF <-> JAX parameter mapping: one declarative table used by the model loader, the converter and the tests.

Each `KeyRule` says which HF checkpoint key pattern becomes which parameter of `DeepseekForCausalLM`, and how the
tensor is transformed (torch Linear weights are ``[out, in]``; JAX kernels are ``[in, out]``, attention kernels are
split per head). ``{i}`` is the absolute layer index and ``{j}`` the routed-expert index. Per-layer parameters live
in scanned stacks; `locate_layer` finds the stack and the slice.

Public entry points:
  * `load_hf_state_dict(model, state_dict)` copies a HF-keyed state dict (numpy arrays or torch tensors) into a
    model, checking that every key is used exactly once and every parameter is filled exactly once.
  * `to_hf_state_dict(model)` yields ``(key, numpy array)`` in the v1 layout (per-expert keys, ``[out, in]``).
  * `expected_hf_keys(config)` / `hf_key_shapes(config)`: the keys and shapes a checkpoint of ``config`` has.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.hf_io import torch_to_numpy
from deepseekmoe_jax.model import MOE, abstract_model, layer_kinds, locate_layer

GLOBAL, LAYER, DENSE_ONLY, MOE_ONLY = "global", "layer", "dense", "moe"


class WeightError(ValueError):
    """A state dict does not match the model: missing/unexpected key, wrong shape. The message names the key."""


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One row of the mapping table.

    hf: HF key (global) or suffix after ``model.layers.{i}.`` (per layer); may contain ``{j}`` (routed expert).
    path: attribute path inside the model (global) or inside one decoder layer (per layer), '/'-separated.
    scope: GLOBAL, LAYER (every layer), DENSE_ONLY or MOE_ONLY.
    to_jax / to_hf: the tensor transforms, given the config.
    when: predicate on the config for optional parameters (biases, shared experts, untied head).
    """

    hf: str
    path: str
    scope: str
    to_jax: Callable[[np.ndarray, DeepseekConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, DeepseekConfig], np.ndarray]
    when: Callable[[DeepseekConfig], bool] = lambda c: True

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf


def _same(x, c):
    return x


# The transforms only move data (transposes, head splits). They return numpy views where possible and leave the
# copy to the consumer, which can do it cheaply (a strided TensorStore write, a blocked copy): a plain
# np.ascontiguousarray of a transposed [10944, 2048] matrix costs more than reading it from disk.
def _t(x, c):
    return np.swapaxes(x, -1, -2)


def _split_heads(n_heads: Callable[[DeepseekConfig], int]):
    def to_jax(w, c):  # [n * d, h] -> [h, n, d]
        return w.T.reshape(c.hidden_size, n_heads(c), c.head_dim)

    def to_hf(k, c):  # [h, n, d] -> [n * d, h]
        return k.reshape(c.hidden_size, -1).T

    return to_jax, to_hf


def _o_to_jax(w, c):  # [h, n * d] -> [n, d, h]
    return w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)


def _o_to_hf(k, c):  # [n, d, h] -> [h, n * d]
    return k.reshape(-1, c.hidden_size).T


def _bias_to_jax(n_heads):
    return lambda b, c: b.reshape(n_heads(c), c.head_dim)


def _bias_to_hf(b, c):
    return b.reshape(-1)


_Q = lambda c: c.num_attention_heads
_KV = lambda c: c.num_key_value_heads
_has_bias = lambda c: c.attention_bias
_has_shared = lambda c: c.shared_intermediate_size > 0

# Order = checkpoint order: the embedding, then every layer's keys (layer by layer), then the final norm and head.
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "model/embed_tokens", GLOBAL, _same, _same),
    KeyRule("input_layernorm.weight", "input_layernorm/weight", LAYER, _same, _same),
    KeyRule("post_attention_layernorm.weight", "post_attention_layernorm/weight", LAYER, _same, _same),
    KeyRule("self_attn.q_proj.weight", "self_attn/q_proj", LAYER, *_split_heads(_Q)),
    KeyRule("self_attn.k_proj.weight", "self_attn/k_proj", LAYER, *_split_heads(_KV)),
    KeyRule("self_attn.v_proj.weight", "self_attn/v_proj", LAYER, *_split_heads(_KV)),
    KeyRule("self_attn.o_proj.weight", "self_attn/o_proj", LAYER, _o_to_jax, _o_to_hf),
    KeyRule("self_attn.q_proj.bias", "self_attn/q_bias", LAYER, _bias_to_jax(_Q), _bias_to_hf, when=_has_bias),
    KeyRule("self_attn.k_proj.bias", "self_attn/k_bias", LAYER, _bias_to_jax(_KV), _bias_to_hf, when=_has_bias),
    KeyRule("self_attn.v_proj.bias", "self_attn/v_bias", LAYER, _bias_to_jax(_KV), _bias_to_hf, when=_has_bias),
    KeyRule("self_attn.o_proj.bias", "self_attn/o_bias", LAYER, _same, _same, when=_has_bias),
    KeyRule("mlp.gate_proj.weight", "mlp/gate_proj", DENSE_ONLY, _t, _t),
    KeyRule("mlp.up_proj.weight", "mlp/up_proj", DENSE_ONLY, _t, _t),
    KeyRule("mlp.down_proj.weight", "mlp/down_proj", DENSE_ONLY, _t, _t),
    KeyRule("mlp.gate.weight", "mlp/gate/kernel", MOE_ONLY, _t, _t),
    KeyRule("mlp.experts.{j}.gate_proj.weight", "mlp/experts/w_gate", MOE_ONLY, _t, _t),
    KeyRule("mlp.experts.{j}.up_proj.weight", "mlp/experts/w_up", MOE_ONLY, _t, _t),
    KeyRule("mlp.experts.{j}.down_proj.weight", "mlp/experts/w_down", MOE_ONLY, _t, _t),
    KeyRule("mlp.shared_experts.gate_proj.weight", "mlp/shared_experts/gate_proj", MOE_ONLY, _t, _t, when=_has_shared),
    KeyRule("mlp.shared_experts.up_proj.weight", "mlp/shared_experts/up_proj", MOE_ONLY, _t, _t, when=_has_shared),
    KeyRule("mlp.shared_experts.down_proj.weight", "mlp/shared_experts/down_proj", MOE_ONLY, _t, _t, when=_has_shared),
    KeyRule("model.norm.weight", "model/norm/weight", GLOBAL, _same, _same),
    KeyRule("lm_head.weight", "lm_head", GLOBAL, _t, _t, when=lambda c: not c.tie_word_embeddings),
)

# Keys a checkpoint may carry that hold no parameters (recomputed buffers).
IGNORED_KEY_PATTERNS = (
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    re.compile(r".*\.rotary_emb\.inv_freq$"),
)


def is_ignored_key(key: str) -> bool:
    return any(p.match(key) for p in IGNORED_KEY_PATTERNS)


@dataclasses.dataclass(frozen=True)
class KeyTarget:
    """Where one HF tensor goes: ``path`` (attribute path from the model root), and the index into the stacked
    parameter (``(repeat,)`` or ``(repeat, expert)``; empty for global parameters)."""

    rule: KeyRule
    layer: int | None
    expert: int | None
    path: tuple[str | int, ...]
    index: tuple[int, ...]


def _rules_for_layer(config: DeepseekConfig, kind: str) -> Iterator[KeyRule]:
    for rule in KEY_TABLE:
        if not rule.when(config):
            continue
        if (
            rule.scope == LAYER
            or (rule.scope == MOE_ONLY and kind == MOE)
            or (rule.scope == DENSE_ONLY and kind != MOE)
        ):
            yield rule


def layer_path(config: DeepseekConfig, layer: int, rule_path: str) -> tuple[tuple[str | int, ...], int]:
    """Attribute path of a per-layer parameter and its repeat index within the scanned stack."""
    seg, pos, rep = locate_layer(config, layer)
    return ("model", "segments", seg, "layers", pos, *rule_path.split("/")), rep


def iter_targets(config: DeepseekConfig) -> Iterator[tuple[str, KeyTarget]]:
    """Every HF key of a checkpoint of ``config`` with its target, in checkpoint order (layers ascending)."""
    layers_done = False
    for rule in KEY_TABLE:
        if rule.scope == GLOBAL:
            if rule.when(config):
                yield rule.hf, KeyTarget(rule, None, None, tuple(rule.path.split("/")), ())
        elif not layers_done:
            layers_done = True
            for i, kind in enumerate(layer_kinds(config)):
                yield from iter_layer_targets(config, i, kind)


def iter_layer_targets(config: DeepseekConfig, i: int, kind: str | None = None) -> Iterator[tuple[str, KeyTarget]]:
    """The HF keys of decoder layer ``i`` with their targets."""
    kind = kind or layer_kinds(config)[i]
    for rule in _rules_for_layer(config, kind):
        path, rep = layer_path(config, i, rule.path)
        if rule.per_expert:
            for j in range(config.n_routed_experts):
                key = f"model.layers.{i}." + rule.hf.format(j=j)
                yield key, KeyTarget(rule, i, j, path, (rep, j))
        else:
            yield f"model.layers.{i}.{rule.hf}", KeyTarget(rule, i, None, path, (rep,))


def expected_hf_keys(config: DeepseekConfig) -> list[str]:
    return [k for k, _ in iter_targets(config)]


def hf_key_shapes(config: DeepseekConfig) -> dict[str, tuple[int, ...]]:
    """The shape every HF key has in a checkpoint of ``config`` (torch ``[out, in]`` layout)."""
    c = config
    h, n, kv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    by_suffix = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (c.vocab_size, h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (n * d, h),
        "self_attn.k_proj.weight": (kv * d, h),
        "self_attn.v_proj.weight": (kv * d, h),
        "self_attn.o_proj.weight": (h, n * d),
        "self_attn.q_proj.bias": (n * d,),
        "self_attn.k_proj.bias": (kv * d,),
        "self_attn.v_proj.bias": (kv * d,),
        "self_attn.o_proj.bias": (h,),
        "mlp.gate_proj.weight": (c.intermediate_size, h),
        "mlp.up_proj.weight": (c.intermediate_size, h),
        "mlp.down_proj.weight": (h, c.intermediate_size),
        "mlp.gate.weight": (c.n_routed_experts or 0, h),
        "mlp.experts.{j}.gate_proj.weight": (c.moe_intermediate_size, h),
        "mlp.experts.{j}.up_proj.weight": (c.moe_intermediate_size, h),
        "mlp.experts.{j}.down_proj.weight": (h, c.moe_intermediate_size),
        "mlp.shared_experts.gate_proj.weight": (c.shared_intermediate_size, h),
        "mlp.shared_experts.up_proj.weight": (c.shared_intermediate_size, h),
        "mlp.shared_experts.down_proj.weight": (h, c.shared_intermediate_size),
    }
    return {key: by_suffix[t.rule.hf] for key, t in iter_targets(config)}


# ----------------------------------------------------------------------------------------------- model access
def get_variable(model: Any, path: tuple[str | int, ...]):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor
        return torch_to_numpy(x)
    return np.asarray(x)


def load_hf_state_dict(model: Any, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copy a HF-keyed state dict into ``model`` (a `DeepseekForCausalLM`) in place.

    Values may be numpy arrays or torch tensors (any float dtype; cast to the model's ``param_dtype``). Raises
    `WeightError` naming the key on a missing key, an unexpected key (``rotary_emb.inv_freq`` buffers excepted)
    or a shape mismatch; with ``strict=False`` missing/unexpected keys are allowed and the rest is loaded.
    """
    config: DeepseekConfig = model.config
    shapes = hf_key_shapes(config)
    targets = dict(iter_targets(config))
    unexpected = sorted(k for k in state_dict if k not in targets and not is_ignored_key(k))
    missing = [k for k in targets if k not in state_dict]
    if strict and (unexpected or missing):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
        raise WeightError("state dict does not match the config: " + "; ".join(parts))

    buffers: dict[tuple, np.ndarray] = {}
    variables: dict[tuple, Any] = {}
    for key, target in targets.items():
        if key not in state_dict:
            continue
        value = _to_numpy(state_dict[key])
        if tuple(value.shape) != shapes[key]:
            raise WeightError(f"{key}: expected shape {shapes[key]}, found {tuple(value.shape)}")
        var = variables.setdefault(target.path, get_variable(model, target.path))
        buf = buffers.get(target.path)
        if buf is None:  # host copy in the parameter dtype (keeps entries a non-strict load does not cover)
            current = var.get_value()
            if isinstance(current, jax.ShapeDtypeStruct):  # abstract model: every entry gets filled (strict)
                buf = buffers[target.path] = np.zeros(current.shape, current.dtype)
            else:
                buf = buffers[target.path] = np.array(current)
        arr = target.rule.to_jax(value, config).astype(buf.dtype)
        if target.index:
            buf[target.index] = arr
        else:
            buf[...] = arr
    for path, buf in buffers.items():
        var = variables[path]
        var.set_value(jnp.asarray(buf))


def model_from_hf_state_dict(config: DeepseekConfig, state_dict: Mapping[str, Any]):
    """A `DeepseekForCausalLM` holding exactly the weights of a HF-keyed state dict (no random initialisation:
    the model is built abstractly with `nnx.eval_shape`, then every parameter is filled from ``state_dict``)."""
    model = abstract_model(config)
    load_hf_state_dict(model, state_dict, strict=True)
    return model


def to_hf_state_dict(model: Any, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(HF key, numpy array)`` for every parameter in the v1 checkpoint layout and order.

    ``dtype`` (numpy/ml_dtypes) casts the tensors; default: the parameter dtype.
    """
    config: DeepseekConfig = model.config
    cache: dict[tuple, np.ndarray] = {}
    for key, target in iter_targets(config):
        arr = cache.get(target.path)
        if arr is None:
            arr = cache[target.path] = np.asarray(get_variable(model, target.path)[...])
        value = arr[target.index] if target.index else arr
        out = target.rule.to_hf(np.asarray(value), config)
        yield key, (out.astype(dtype) if dtype is not None else np.ascontiguousarray(out))


def hf_keys_of_layer(keys: Iterable[str]) -> dict[int, list[str]]:
    """Group HF keys by decoder layer index (global keys under -1)."""
    out: dict[int, list[str]] = {}
    for k in keys:
        m = re.match(r"model\.layers\.(\d+)\.", k)
        out.setdefault(int(m.group(1)) if m else -1, []).append(k)
    return out
