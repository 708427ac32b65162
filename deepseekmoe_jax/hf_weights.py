"""The HF <-> JAX parameter mapping: one declarative table used by the model loader, the converter and the tests.

Each `KeyRule` says which HF checkpoint key pattern becomes which parameter of `DeepseekForCausalLM`, and how the
tensor is transformed (torch Linear weights are ``[out, in]``; JAX kernels are ``[in, out]``, attention kernels are
split per head). ``{i}`` is the absolute layer index and ``{j}`` the routed-expert index. Per-layer parameters live
in scanned stacks; `locate_layer` finds the stack and the slice.

Public entry points:
  * `load_hf_state_dict(model, state_dict)` copies a HF-keyed state dict (numpy arrays or torch tensors) into a
    model, checking that every key is used exactly once and every parameter is filled exactly once.
  * `to_hf_state_dict(model)` yields ``(key, numpy array)`` in the v1 layout (per-expert keys, ``[out, in]``).
  * `iter_targets(config)` / `hf_key_shapes(config)`: the keys (with their targets) and shapes a checkpoint of
    ``config`` has; `key_fields(key, config)`: the config.json fields a key depends on.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.hf_io import torch_to_numpy
from deepseekmoe_jax.model import LayerKind, abstract_model, layer_kinds, locate_layer


class KeyScope(enum.Enum):
    """Which part of the model a key-table row covers."""

    GLOBAL = "global"  # one key for the whole model (embedding, final norm, LM head)
    LAYER = "layer"  # every decoder layer
    DENSE_ONLY = "dense"  # dense decoder layers only
    MOE_ONLY = "moe"  # MoE decoder layers only

    def covers(self, kind: LayerKind) -> bool:
        """Whether a row of this scope has a key in a decoder layer of ``kind``."""
        return (
            self is KeyScope.LAYER
            or (self is KeyScope.MOE_ONLY and kind is LayerKind.MOE)
            or (self is KeyScope.DENSE_ONLY and kind is LayerKind.DENSE)
        )


LAYER_PREFIX = "model.layers.{i}."  # per-layer keys are this prefix + the row's ``hf``
_LAYER_KEY = re.compile(re.escape(LAYER_PREFIX).replace(re.escape("{i}"), r"(?P<layer>\d+)"))


class WeightError(ValueError):
    """A state dict does not match the model: missing/unexpected key, wrong shape. The message names the key."""


Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One row of the mapping table.

    hf: HF key (global) or suffix after ``model.layers.{i}.`` (per layer); may contain ``{j}`` (routed expert).
    path: attribute path inside the model (global) or inside one decoder layer (per layer), '/'-separated.
    scope: which keys of the model the row covers (`KeyScope`).
    to_jax / to_hf: the tensor transforms, given the config.
    shape: the HF tensor's shape (torch ``[out, in]`` layout) for a config.
    fields: the config.json fields that decide whether the key exists and what shape it has (named in errors).
    when: predicate on the config for optional parameters (biases, shared experts, untied head).
    """

    hf: str
    path: str
    scope: KeyScope
    to_jax: Callable[[np.ndarray, DeepseekConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, DeepseekConfig], np.ndarray]
    shape: Callable[[DeepseekConfig], Shape]
    fields: tuple[str, ...]
    when: Callable[[DeepseekConfig], bool] = lambda c: True

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        """The HF keys of this row, whatever the config (layer and expert indices as groups ``layer``/``expert``)."""
        key = re.escape(self.hf).replace(re.escape("{j}"), r"(?P<expert>\d+)")
        return re.compile(key if self.scope is KeyScope.GLOBAL else _LAYER_KEY.pattern + key)


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
_SAME, _T = (_same, _same), (_t, _t)
_GLOBAL, _LAYER, _DENSE, _MOE = KeyScope.GLOBAL, KeyScope.LAYER, KeyScope.DENSE_ONLY, KeyScope.MOE_ONLY

# HF shapes ([out, in]) of the rows, by the config.
_H = lambda c: (c.hidden_size,)
_VOCAB_H = lambda c: (c.vocab_size, c.hidden_size)
_Q_W = lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)
_KV_W = lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)
_O_W = lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)
_Q_B = lambda c: (c.num_attention_heads * c.head_dim,)
_KV_B = lambda c: (c.num_key_value_heads * c.head_dim,)
_IN = lambda width: lambda c: (width(c), c.hidden_size)  # gate/up projections: [width, hidden]
_OUT = lambda width: lambda c: (c.hidden_size, width(c))  # down projections: [hidden, width]
_DENSE_I = lambda c: c.intermediate_size
_EXPERT_I = lambda c: c.moe_intermediate_size
_SHARED_I = lambda c: c.shared_intermediate_size
_GATE_W = lambda c: (c.n_routed_experts or 0, c.hidden_size)

# The config.json fields behind the rows (error messages name them with their values).
_F_EMBED = ("vocab_size", "hidden_size")
_F_HEAD = ("vocab_size", "hidden_size", "tie_word_embeddings")
_F_NORM = ("hidden_size",)
_F_Q = ("num_attention_heads", "hidden_size")
_F_KV = ("num_key_value_heads", "num_attention_heads", "hidden_size")
_F_BIAS = ("attention_bias",)
_F_DENSE = ("intermediate_size", "hidden_size", "first_k_dense_replace", "moe_layer_freq")
_F_GATE = ("n_routed_experts", "hidden_size")
_F_EXPERT = ("n_routed_experts", "moe_intermediate_size", "hidden_size")
_F_SHARED = ("n_shared_experts", "moe_intermediate_size", "hidden_size")

# Order = checkpoint order: the embedding, then every layer's keys (layer by layer), then the final norm and head.
# fmt: off
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "model/embed_tokens", _GLOBAL, *_SAME, _VOCAB_H, _F_EMBED),
    KeyRule("input_layernorm.weight", "input_layernorm/weight", _LAYER, *_SAME, _H, _F_NORM),
    KeyRule("post_attention_layernorm.weight", "post_attention_layernorm/weight", _LAYER, *_SAME, _H, _F_NORM),
    KeyRule("self_attn.q_proj.weight", "self_attn/q_proj", _LAYER, *_split_heads(_Q), _Q_W, _F_Q),
    KeyRule("self_attn.k_proj.weight", "self_attn/k_proj", _LAYER, *_split_heads(_KV), _KV_W, _F_KV),
    KeyRule("self_attn.v_proj.weight", "self_attn/v_proj", _LAYER, *_split_heads(_KV), _KV_W, _F_KV),
    KeyRule("self_attn.o_proj.weight", "self_attn/o_proj", _LAYER, _o_to_jax, _o_to_hf, _O_W, _F_Q),
    KeyRule("self_attn.q_proj.bias", "self_attn/q_bias", _LAYER, _bias_to_jax(_Q), _bias_to_hf, _Q_B, _F_BIAS,
            when=_has_bias),
    KeyRule("self_attn.k_proj.bias", "self_attn/k_bias", _LAYER, _bias_to_jax(_KV), _bias_to_hf, _KV_B, _F_BIAS,
            when=_has_bias),
    KeyRule("self_attn.v_proj.bias", "self_attn/v_bias", _LAYER, _bias_to_jax(_KV), _bias_to_hf, _KV_B, _F_BIAS,
            when=_has_bias),
    KeyRule("self_attn.o_proj.bias", "self_attn/o_bias", _LAYER, *_SAME, _H, _F_BIAS, when=_has_bias),
    KeyRule("mlp.gate_proj.weight", "mlp/gate_proj", _DENSE, *_T, _IN(_DENSE_I), _F_DENSE),
    KeyRule("mlp.up_proj.weight", "mlp/up_proj", _DENSE, *_T, _IN(_DENSE_I), _F_DENSE),
    KeyRule("mlp.down_proj.weight", "mlp/down_proj", _DENSE, *_T, _OUT(_DENSE_I), _F_DENSE),
    KeyRule("mlp.gate.weight", "mlp/gate/kernel", _MOE, *_T, _GATE_W, _F_GATE),
    KeyRule("mlp.experts.{j}.gate_proj.weight", "mlp/experts/w_gate", _MOE, *_T, _IN(_EXPERT_I), _F_EXPERT),
    KeyRule("mlp.experts.{j}.up_proj.weight", "mlp/experts/w_up", _MOE, *_T, _IN(_EXPERT_I), _F_EXPERT),
    KeyRule("mlp.experts.{j}.down_proj.weight", "mlp/experts/w_down", _MOE, *_T, _OUT(_EXPERT_I), _F_EXPERT),
    KeyRule("mlp.shared_experts.gate_proj.weight", "mlp/shared_experts/gate_proj", _MOE, *_T, _IN(_SHARED_I),
            _F_SHARED, when=_has_shared),
    KeyRule("mlp.shared_experts.up_proj.weight", "mlp/shared_experts/up_proj", _MOE, *_T, _IN(_SHARED_I),
            _F_SHARED, when=_has_shared),
    KeyRule("mlp.shared_experts.down_proj.weight", "mlp/shared_experts/down_proj", _MOE, *_T, _OUT(_SHARED_I),
            _F_SHARED, when=_has_shared),
    KeyRule("model.norm.weight", "model/norm/weight", _GLOBAL, *_SAME, _H, _F_NORM),
    KeyRule("lm_head.weight", "lm_head", _GLOBAL, *_T, _VOCAB_H, _F_HEAD, when=lambda c: not c.tie_word_embeddings),
)
# fmt: on

# Keys a checkpoint may carry that hold no parameters (recomputed rotary buffers).
IGNORED_KEY = re.compile(r".*\.rotary_emb\.inv_freq")


def is_ignored_key(key: str) -> bool:
    return IGNORED_KEY.fullmatch(key) is not None


def key_fields(key: str, config: DeepseekConfig) -> tuple[str, ...]:
    """The config.json fields that decide whether HF key ``key`` exists in a checkpoint of ``config`` and what
    shape it has: ``num_hidden_layers`` for a layer beyond the config's, else those of the key-table row whose
    pattern ``key`` has (``hidden_size`` for a key of no row)."""
    layer = _LAYER_KEY.match(key)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        return ("num_hidden_layers",)
    for rule in KEY_TABLE:
        if rule.pattern.fullmatch(key):
            return rule.fields
    return ("hidden_size",)


@dataclasses.dataclass(frozen=True)
class KeyTarget:
    """Where one HF tensor goes: ``path`` (attribute path from the model root), and the index into the stacked
    parameter (``(repeat,)`` or ``(repeat, expert)``; empty for global parameters)."""

    rule: KeyRule
    layer: int | None
    expert: int | None
    path: tuple[str | int, ...]
    index: tuple[int, ...]


def _rules_for_layer(config: DeepseekConfig, kind: LayerKind) -> Iterator[KeyRule]:
    for rule in KEY_TABLE:
        if rule.when(config) and rule.scope.covers(kind):
            yield rule


def _layer_path(config: DeepseekConfig, layer: int, rule_path: str) -> tuple[tuple[str | int, ...], int]:
    """Attribute path of a per-layer parameter and its repeat index within the scanned stack."""
    seg, pos, rep = locate_layer(config, layer)
    return ("model", "segments", seg, "layers", pos, *rule_path.split("/")), rep


def iter_targets(config: DeepseekConfig) -> Iterator[tuple[str, KeyTarget]]:
    """Every HF key of a checkpoint of ``config`` with its target, in checkpoint order (layers ascending)."""
    layers_done = False
    for rule in KEY_TABLE:
        if rule.scope is KeyScope.GLOBAL:
            if rule.when(config):
                yield rule.hf, KeyTarget(rule, None, None, tuple(rule.path.split("/")), ())
        elif not layers_done:
            layers_done = True
            for i, kind in enumerate(layer_kinds(config)):
                yield from _iter_layer_targets(config, i, kind)


def _iter_layer_targets(
    config: DeepseekConfig, i: int, kind: LayerKind | None = None
) -> Iterator[tuple[str, KeyTarget]]:
    """The HF keys of decoder layer ``i`` with their targets."""
    kind = kind or layer_kinds(config)[i]
    prefix = LAYER_PREFIX.format(i=i)
    for rule in _rules_for_layer(config, kind):
        path, rep = _layer_path(config, i, rule.path)
        if rule.per_expert:
            for j in range(config.n_routed_experts):
                yield prefix + rule.hf.format(j=j), KeyTarget(rule, i, j, path, (rep, j))
        else:
            yield prefix + rule.hf, KeyTarget(rule, i, None, path, (rep,))


def hf_key_shapes(config: DeepseekConfig) -> dict[str, Shape]:
    """The shape every HF key has in a checkpoint of ``config`` (torch ``[out, in]`` layout)."""
    return {key: t.rule.shape(config) for key, t in iter_targets(config)}


# ----------------------------------------------------------------------------------------------- model access
def _get_variable(model: Any, path: tuple[str | int, ...]):
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
        var = variables.setdefault(target.path, _get_variable(model, target.path))
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
            arr = cache[target.path] = np.asarray(_get_variable(model, target.path)[...])
        value = arr[target.index] if target.index else arr
        out = target.rule.to_hf(np.asarray(value), config)
        yield key, (out.astype(dtype) if dtype is not None else np.ascontiguousarray(out))
