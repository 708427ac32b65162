"""Decoder layers, scanned layer stacks, `DeepseekModel` and `DeepseekForCausalLM`.

Layer layout. The reference rule makes layer ``i`` MoE iff ``i >= first_k_dense_replace and i % moe_layer_freq ==
0``. `layer_plan` turns the layer sequence into a few *segments*, each a block of layer kinds repeated ``repeats``
times: e.g. 16B = ``[dense] x 1, [moe] x 27``; ``moe_layer_freq=2`` gives ``[moe, dense] x n``. Each segment's
parameters are stacked along a leading ``layers`` dimension and run with `jax.lax.scan`, so compile time does not
grow with depth. `locate_layer` maps an absolute layer index to (segment, position in block, repeat).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.layers import MLP, Attention, RMSNorm, causal_padding_mask, make_param, rope_cos_sin
from deepseekmoe_jax.moe import MoEBlock, MoEMetrics
from deepseekmoe_jax.partitioning import constrain

Array = jax.Array


class LayerKind(enum.StrEnum):
    """What a decoder layer's MLP is: a dense SwiGLU or a MoE block (string-valued, as printed and compared)."""

    DENSE = "dense"
    MOE = "moe"


# ----------------------------------------------------------------------------------------------- layer plan
@dataclasses.dataclass(frozen=True)
class Segment:
    """``repeats`` consecutive copies of a block of layers whose kinds are ``kinds``, starting at ``first_layer``."""

    kinds: tuple[LayerKind, ...]
    repeats: int
    first_layer: int

    @property
    def num_layers(self) -> int:
        return len(self.kinds) * self.repeats

    def layer_index(self, repeat: int, position: int) -> int:
        return self.first_layer + repeat * len(self.kinds) + position


def layer_kinds(config: DeepseekConfig) -> tuple[LayerKind, ...]:
    return tuple(LayerKind.MOE if config.is_moe_layer(i) else LayerKind.DENSE for i in range(config.num_hidden_layers))


def layer_plan(config: DeepseekConfig) -> tuple[Segment, ...]:
    """Split the layer sequence into scanned segments (see the module docstring)."""
    kinds = layer_kinds(config)
    n = len(kinds)
    if LayerKind.MOE not in kinds:
        return (Segment((LayerKind.DENSE,), n, 0),)
    segments = []
    first_moe = kinds.index(LayerKind.MOE)
    if first_moe:
        segments.append(Segment((LayerKind.DENSE,), first_moe, 0))
    period = config.moe_layer_freq
    full = (n - first_moe) // period
    if full:
        segments.append(Segment(kinds[first_moe : first_moe + period], full, first_moe))
    start = first_moe + full * period
    if start < n:
        segments.append(Segment(kinds[start:], 1, start))
    rebuilt = tuple(k for seg in segments for _ in range(seg.repeats) for k in seg.kinds)
    assert rebuilt == kinds, (rebuilt, kinds)
    return tuple(segments)


def locate_layer(config: DeepseekConfig, layer: int) -> tuple[int, int, int]:
    """Absolute layer index -> (segment index, position within the block, repeat index)."""
    if not 0 <= layer < config.num_hidden_layers:
        raise IndexError(f"layer {layer} out of range for num_hidden_layers={config.num_hidden_layers}")
    for s, seg in enumerate(layer_plan(config)):
        if seg.first_layer <= layer < seg.first_layer + seg.num_layers:
            repeat, position = divmod(layer - seg.first_layer, len(seg.kinds))
            return s, position, repeat
    raise AssertionError("unreachable")


def moe_layer_indices(config: DeepseekConfig) -> tuple[int, ...]:
    return tuple(i for i, k in enumerate(layer_kinds(config)) if k == LayerKind.MOE)


# ----------------------------------------------------------------------------------------------- layers
_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_moe_outputs": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: ``h = x + attn(norm(x)); y = h + mlp(norm(h))`` with a dense or MoE ``mlp``."""

    def __init__(self, config: DeepseekConfig, kind: LayerKind, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        c = config
        pd = jnp.dtype(c.options.param_dtype)
        self.kind = kind
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=pd, stack=stack)
        self.self_attn = Attention(c, rngs=rngs, stack=stack)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=pd, stack=stack)
        if kind == LayerKind.MOE:
            self.mlp = MoEBlock(c, rngs=rngs, stack=stack)
        else:
            self.mlp = MLP(c, c.intermediate_size, rngs=rngs, stack=stack)

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array | None, token_mask: Array | None, training: bool
    ) -> tuple[Array, Array, MoEMetrics | None]:
        attn = checkpoint_name(self.self_attn(self.input_layernorm(x), cos, sin, mask), "attn_out")
        h = constrain(x + attn, ("act_batch", "act_length", "act_embed"))
        normed = self.post_attention_layernorm(h)
        if self.kind == LayerKind.MOE:
            moe = self.mlp(normed, token_mask, training=training)
            out, aux, metrics = moe.out, moe.aux_loss, moe.metrics
        else:
            out, aux, metrics = self.mlp(normed), jnp.zeros((), jnp.float32), None
        y = constrain(h + checkpoint_name(out, "mlp_out"), ("act_batch", "act_length", "act_embed"))
        return y, aux, metrics


class LayerStack(nnx.Module):
    """One `Segment`: a block of layers (one per kind) with parameters stacked ``repeats`` deep, run by scan."""

    def __init__(self, config: DeepseekConfig, segment: Segment, *, rngs: nnx.Rngs):
        self.config = config
        self.segment = segment
        self.layers = nnx.List(
            [DecoderLayer(config, kind, rngs=rngs, stack=(segment.repeats,)) for kind in segment.kinds]
        )

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array | None, token_mask: Array | None, training: bool
    ) -> tuple[Array, Array, list[MoEMetrics]]:
        """Returns the output, the summed aux loss and, per MoE position of the block, metrics [repeats, ...]."""
        graphdef, state = nnx.split(self.layers)

        def block(x, layer_state):
            layers = nnx.merge(graphdef, layer_state)
            aux = jnp.zeros((), jnp.float32)
            metrics = []
            for layer in layers:
                x, a, m = layer(x, cos, sin, mask, token_mask, training)
                aux = aux + a
                if m is not None:
                    metrics.append(m)
            return x, (aux, metrics)

        policy = self.config.options.remat_policy
        if training and policy != "none":
            block = jax.checkpoint(block, policy=_REMAT_POLICIES.get(policy), prevent_cse=False)

        if self.config.options.scan_layers:
            x, (aux, metrics) = jax.lax.scan(block, x, state)
        else:
            outs = []
            for r in range(self.segment.repeats):
                x, out = block(x, jax.tree.map(lambda a, r=r: a[r], state))
                outs.append(out)
            aux, metrics = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, jnp.sum(aux), metrics


# ----------------------------------------------------------------------------------------------- model
@flax.struct.dataclass
class ModelOutput:
    """Output of `DeepseekModel`: final-normed ``hidden_states`` [B, T, H] (compute dtype), the summed balance loss
    ``aux_loss`` (float32 scalar; 0 outside training) and per-MoE-layer ``moe_metrics`` (stacked in layer order:
    ``dropped_fraction`` [L_moe], ``expert_load`` [L_moe, E]; None for a dense model)."""

    hidden_states: Array
    aux_loss: Array
    moe_metrics: MoEMetrics | None


@flax.struct.dataclass
class CausalLMOutput:
    """Output of `DeepseekForCausalLM`: float32 ``logits`` [B, T, vocab] plus the fields of `ModelOutput`."""

    logits: Array
    aux_loss: Array
    moe_metrics: MoEMetrics | None
    hidden_states: Array | None = None


class DeepseekModel(nnx.Module):
    """Embedding, the decoder layers (scanned segments) and the final RMSNorm."""

    def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        pd = jnp.dtype(c.options.param_dtype)
        self.embed_tokens = make_param(
            rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd, std=c.options.init_std
        )
        self.segments = nnx.List([LayerStack(c, seg, rngs=rngs) for seg in layer_plan(c)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=pd)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        *,
        training: bool = False,
    ) -> ModelOutput:
        """input_ids [B, T] int; attention_mask [B, T] (1 = real token, 0 = padding) or None; positions [B, T]
        (default ``0..T-1`` like the reference's forward)."""
        c = self.config
        b, t = input_ids.shape
        dt = jnp.dtype(c.options.dtype)
        # Look rows up in the table with its hidden dimension whole (as FSDP gathers any weight before use); from an
        # embed-sharded table XLA cannot reach the batch-sharded layout below and would replicate the activations.
        table = constrain(self.embed_tokens[...], ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(dt)  # [B, T, H]
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(c, positions)
        mask = None
        if attention_mask is not None:
            index = jnp.arange(t, dtype=jnp.int32)
            mask = causal_padding_mask(attention_mask, index, index)

        aux = jnp.zeros((), jnp.float32)
        collected: list[MoEMetrics] = []  # per segment, [n_moe_layers_of_segment, ...] in layer order
        for segment_module in self.segments:
            x, seg_aux, metrics = segment_module(x, cos, sin, mask, attention_mask, training)
            aux = aux + seg_aux
            if metrics:
                # metrics: one entry per MoE position p of the block, each [repeats, ...]. Layer order within the
                # segment is repeat-major, position-minor: stack to [P, R, ...] and flatten as [R * P, ...].
                collected.append(
                    jax.tree.map(lambda *a: jnp.swapaxes(jnp.stack(a), 0, 1).reshape(-1, *a[0].shape[1:]), *metrics)
                )
        moe_metrics = None
        if collected:
            moe_metrics = jax.tree.map(lambda *a: jnp.concatenate(a), *collected)
        return ModelOutput(self.norm(x), aux, moe_metrics)


class DeepseekForCausalLM(nnx.Module):
    """DeepSeekMoE causal language model.

    ``model(input_ids, attention_mask=None, positions=None)`` returns a `CausalLMOutput` with float32 logits
    [B, T, vocab] and the summed balance loss (zero unless training). Training mode follows NNX: ``model.train()``
    / ``model.eval()``, or pass ``training=`` explicitly. Evaluation defaults to the exact no-drop MoE dispatch.

    Deviation from the reference: the LM head matmul accumulates in float32 (the reference rounds logits to the
    compute dtype first, then upcasts).
    """

    def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.model = DeepseekModel(c, rngs=rngs)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = make_param(
                rngs,
                (c.hidden_size, c.vocab_size),
                ("embed", "vocab"),
                jnp.dtype(c.options.param_dtype),
                std=c.options.init_std,
            )
        self.deterministic = True  # NNX convention: .train() sets False, .eval() sets True

    def lm_head_kernel(self) -> Array:
        """The [H, vocab] output projection (the transposed embedding when weights are tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden_states: Array) -> Array:
        """hidden [..., H] -> float32 logits [..., vocab]."""
        kernel = self.lm_head_kernel().astype(hidden_states.dtype)
        logits = jnp.einsum("...h,hv->...v", hidden_states, kernel, preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return logits

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        *,
        training: bool | None = None,
        return_hidden_states: bool = False,
    ) -> CausalLMOutput:
        if training is None:
            training = not self.deterministic
        out = self.model(input_ids, attention_mask, positions, training=training)
        return CausalLMOutput(
            logits=self.logits(out.hidden_states),
            aux_loss=out.aux_loss,
            moe_metrics=out.moe_metrics,
            hidden_states=out.hidden_states if return_hidden_states else None,
        )


def abstract_model(config: DeepseekConfig, seed: int = 0) -> DeepseekForCausalLM:
    """``DeepseekForCausalLM(config)`` built with `nnx.eval_shape`: every parameter is a `jax.ShapeDtypeStruct`
    carrying its shape, dtype and logical axes, and nothing is allocated. ``seed`` seeds the (abstract) RNG state."""
    return nnx.eval_shape(lambda: DeepseekForCausalLM(config, rngs=nnx.Rngs(seed)))


def param_count(tree: Any) -> int:
    """Number of parameters of a model, state or abstract state (works on `jax.eval_shape` output)."""
    return sum(
        int(x.size) for x in jax.tree.leaves(nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree)
    )
