"""Dense building blocks: parameters with logical axes, RMSNorm, rotary embeddings, attention, SwiGLU MLP.

Every parameter is an `nnx.Param` whose metadata ``logical_axes`` names its dimensions (``embed``, ``mlp``,
``q_heads``, ...). Only `deepseekmoe_jax.partitioning` knows how those names map to mesh axes.

Modules take a ``stack`` tuple: when layers of one kind are run under `jax.lax.scan`, their parameters are created
with leading stacked dimensions (logical name ``layers``) and the module's ``__call__`` sees one slice at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.partitioning import constrain, sharded

Array = jax.Array


def make_param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype,
    *,
    std: float | None,
    stack: tuple[int, ...] = (),
) -> nnx.Param:
    """A parameter of shape ``stack + shape`` drawn from N(0, std) (``std=None``: ones) with logical axes."""
    full = (*stack, *shape)
    if std is None:
        value = jnp.ones(full, dtype)
    elif sharded():
        # Under a multi-device mesh (sharded init), draw in the parameter's own shape: the threefry counters then
        # follow the output sharding and each device generates only its shard; a flat draw would be materialised
        # whole on every device before the reshape. The values are the same as the flat draw's.
        value = (std * jax.random.normal(rngs.params(), full, jnp.float32)).astype(dtype)
    else:
        # Drawn flat, then reshaped: XLA compiles a rank-1 threefry far faster than a rank-4 one.
        size = math.prod(full)
        value = (std * jax.random.normal(rngs.params(), (size,), jnp.float32)).astype(dtype).reshape(full)
    return nnx.Param(value, logical_axes=(("layers",) * len(stack)) + tuple(axes))


class RMSNorm(nnx.Module):
    """RMSNorm as in the reference: statistics in float32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype, stack: tuple[int, ...] = ()):
        self.eps = eps
        self.weight = make_param(None, (dim,), ("norm",), param_dtype, std=None, stack=stack)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


# ----------------------------------------------------------------------------------------------- rotary
def rope_inv_freq(config: DeepseekConfig, seq_len: Array | int | None = None) -> Array:
    """Inverse frequencies ``1 / base^(2i/d)`` [head_dim/2], float32.

    ``linear`` scaling divides them by the factor (= dividing positions). ``dynamic`` (NTK) scaling raises the base
    to ``theta * (f * L / max_pos - (f - 1)) ** (d / (d - 2))`` when the sequence length ``L`` (largest position
    + 1) exceeds ``max_position_embeddings``; ``seq_len`` may be traced.
    """
    d = config.head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    theta = jnp.float32(config.rope_theta)
    base = theta
    if config.rope_type == "dynamic" and seq_len is not None:
        f = jnp.float32(config.rope_factor)
        max_pos = jnp.float32(config.max_position_embeddings)
        length = jnp.asarray(seq_len, jnp.float32)
        scaled = theta * ((f * length / max_pos) - (f - 1.0)) ** (d / (d - 2))
        base = jnp.where(length > max_pos, scaled, theta)
    inv_freq = 1.0 / (base**exponents)
    if config.rope_type == "linear":
        inv_freq = inv_freq / jnp.float32(config.rope_factor)
    return inv_freq


def rope_cos_sin(config: DeepseekConfig, positions: Array, seq_len: Array | int | None = None) -> tuple[Array, Array]:
    """cos and sin tables for integer ``positions`` [B, T] -> two float32 arrays [B, T, head_dim].

    ``seq_len`` drives dynamic NTK scaling (default: largest position + 1, as the reference does).
    """
    if seq_len is None and config.rope_type == "dynamic":
        seq_len = jnp.max(positions) + 1
    inv_freq = rope_inv_freq(config, seq_len)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, d]: the rotate_half layout
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x * cos + rotate_half(x) * sin`` for x [B, T, N, D]; cos/sin [B, T, D] are cast to x's dtype first."""
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------- attention
def _use_cudnn(impl: str, dtype, head_dim: int) -> bool:
    """``auto`` picks cuDNN's fused attention only where it is known to apply: on GPU, in 16-bit compute, with a
    head size that is a multiple of 8 and at most 128 (deepseek-moe-16b: 128); otherwise XLA's attention."""
    if impl == "cudnn":
        return True
    if impl == "xla":
        return False
    return (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def attention_core(q: Array, k: Array, v: Array, mask: Array | None, impl: str) -> Array:
    """Scaled dot-product attention through `jax.nn.dot_product_attention`.

    q [B, T, N, D], k/v [B, S, K, D] (GQA when K < N). ``mask`` None means plain causal attention with T == S
    (the cuDNN flash kernel on GPU); otherwise a boolean [B, 1, T, S] mask (True = attend) that already includes
    causality. Softmax is float32.
    """
    if mask is None:
        implementation = "cudnn" if _use_cudnn(impl, q.dtype, q.shape[-1]) else "xla"
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def causal_padding_mask(
    attention_mask: Array | None, q_index: Array, kv_index: Array, kv_valid: Array | None = None
) -> Array:
    """Boolean mask [B, 1, T, S]: key s is visible to query t iff ``kv_index[s] <= q_index[t]`` and the key is a
    real token (``attention_mask`` [B, S] nonzero, and ``kv_valid`` [B, S] where given)."""
    causal = kv_index[None, None, None, :] <= q_index[None, None, :, None]  # [1, 1, T, S]
    mask = causal
    if attention_mask is not None:
        mask = jnp.logical_and(mask, attention_mask.astype(bool)[:, None, None, :])
    if kv_valid is not None:
        mask = jnp.logical_and(mask, kv_valid[:, None, None, :])
    return mask


class Attention(nnx.Module):
    """Llama-style attention (MHA or GQA) with rotary embeddings.

    Kernels: q ``[embed, q_heads, head_dim]``, k/v ``[embed, kv_heads, head_dim]``, o ``[q_heads, head_dim,
    embed]`` (the HF ``[out, in]`` Linear weights, transposed and split per head).
    """

    def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        c, o = config, config.options
        h, n, kv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        pd, std = jnp.dtype(o.param_dtype), o.init_std
        self.config = config
        self.q_proj = make_param(rngs, (h, n, d), ("embed", "q_heads", "head_dim"), pd, std=std, stack=stack)
        self.k_proj = make_param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pd, std=std, stack=stack)
        self.v_proj = make_param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pd, std=std, stack=stack)
        self.o_proj = make_param(rngs, (n, d, h), ("q_heads", "head_dim", "embed"), pd, std=std, stack=stack)
        if c.attention_bias:
            zeros = dict(std=0.0, stack=stack)
            self.q_bias = make_param(rngs, (n, d), ("q_heads", "head_dim"), pd, **zeros)
            self.k_bias = make_param(rngs, (kv, d), ("kv_heads", "head_dim"), pd, **zeros)
            self.v_bias = make_param(rngs, (kv, d), ("kv_heads", "head_dim"), pd, **zeros)
            self.o_bias = make_param(rngs, (h,), ("embed",), pd, **zeros)

    def project_qkv(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """x [B, T, H] -> q [B, T, N, D], k and v [B, T, K, D], with RoPE applied to q and k."""
        dt = x.dtype
        q = jnp.einsum("bth,hnd->btnd", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bth,hkd->btkd", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bth,hkd->btkd", x, self.v_proj[...].astype(dt))
        if self.config.attention_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_out(self, attn: Array) -> Array:
        """attn [B, T, N, D] -> [B, T, H]."""
        out = jnp.einsum("btnd,ndh->bth", attn, self.o_proj[...].astype(attn.dtype))
        if self.config.attention_bias:
            out = out + self.o_bias[...].astype(out.dtype)
        return out

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array | None) -> Array:
        q, k, v = self.project_qkv(x, cos, sin)
        attn = attention_core(q, k, v, mask, self.config.options.attention_impl)
        return self.project_out(attn)


# ----------------------------------------------------------------------------------------------- MLP
class MLP(nnx.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``: the dense layers and the fused shared experts."""

    def __init__(self, config: DeepseekConfig, width: int, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        h = config.hidden_size
        pd, std = jnp.dtype(config.options.param_dtype), config.options.init_std
        self.gate_proj = make_param(rngs, (h, width), ("embed", "mlp"), pd, std=std, stack=stack)
        self.up_proj = make_param(rngs, (h, width), ("embed", "mlp"), pd, std=std, stack=stack)
        self.down_proj = make_param(rngs, (width, h), ("mlp", "embed"), pd, std=std, stack=stack)

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        gate = jnp.einsum("...h,hi->...i", x, self.gate_proj[...].astype(dt))
        up = jnp.einsum("...h,hi->...i", x, self.up_proj[...].astype(dt))
        act = jax.nn.silu(gate) * up
        act = constrain(act, ("act_batch", "act_length", "act_mlp")) if act.ndim == 3 else act
        return jnp.einsum("...i,ih->...h", act, self.down_proj[...].astype(dt))
