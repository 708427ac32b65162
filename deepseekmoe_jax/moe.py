"""The DeepSeekMoE block: softmax top-k gate, fused shared experts, and three dispatch paths for the routed experts.

Shapes (one letter per dimension in the einsum strings):
  b batch, t sequence, h hidden, e routed experts, k choices per token, g token groups, s tokens per group,
  c capacity slots per expert (and group), i expert width, n tokens (``b * t``), N assignments (``n * k``).

`MoEBlock` routes (gate, balance losses, expert-load metrics) and hands the (token, choice) assignments to one of
the paths of `DISPATCHES`, all ``(experts, x [b, t, h], routing, valid [b, t], config, training) -> (y [b, t, h],
DispatchStats)``; ``options.moe_dispatch`` chooses, "auto" by `dispatch_mode`:

- "capacity" (`capacity_dispatch`, training with a capacity factor): each sequence is cut into groups of ``s``
  consecutive tokens. Within a group, expert ``e`` has ``c`` slots, given out in token order: the token at
  position ``s`` takes slot ``#(earlier tokens of the group routed to e)`` if that is below ``c``, otherwise its
  assignment is dropped (contributes zero). Because a token picks an expert at most once, "priority by position,
  then by choice rank" reduces to priority by position, and whether a token keeps its slot depends only on tokens
  at or before it: dropping is causal. One-hot dispatch/combine tensors [g, s, e, c] and expert buckets
  [e, g, c, h]. With ``c = s`` (capacity factor null) nothing is dropped, at e/k times the routed work.
- "dropless" (`dropless_dispatch`, no-drop mode): exact. The N assignments are stably sorted by expert and laid
  into buckets [e, C, h]; C is the smallest of a few compiled sizes (`dropless_capacities`, multiples of
  ``ceil(N / e)`` up to ``n``) that holds the busiest expert, chosen at run time. Gathers and a weighted sum, no
  one-hot tensor.
- "gather" (`gather_dispatch`, no-drop mode with ``N < e``: decode): exact. The chosen experts' kernels are
  gathered per (token, choice), [n, k, h, i], so a step reads about k/e of the routed-expert weights per token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseekmoe_jax.config import DeepseekConfig, capacity
from deepseekmoe_jax.layers import MLP, make_param
from deepseekmoe_jax.partitioning import constrain

Array = jax.Array


class Routing(NamedTuple):
    """Gate output for tokens [..., h]: softmax ``scores`` [..., e] (float32), the greedy top-k ``weights``
    [..., k] (float32, renormalised when ``norm_topk_prob``) and expert ``indices`` [..., k] (int32)."""

    scores: Array
    weights: Array
    indices: Array


class MoEMetrics(NamedTuple):
    """Per-MoE-layer statistics: ``dropped_fraction`` (scalar, share of (token, choice) assignments of real tokens
    that found no slot) and ``expert_load`` [e] (share of assignments routed to each expert before dropping)."""

    dropped_fraction: Array
    expert_load: Array


def route(logits: Array, k: int, norm_topk_prob: bool) -> Routing:
    """Softmax over experts in float32, greedy top-k, optional renormalisation (``w / (sum w + 1e-20)``)."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    # Greedy top-k as a stable sort over the expert axis (ties go to the lower expert index, as lax.top_k does):
    # the sort partitions along the token dimensions, whereas XLA's SPMD partitioner gathers the whole [b, t, e]
    # score tensor onto every device for a TopK.
    expert_ids = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
    neg_sorted, ids_sorted = jax.lax.sort((-scores, expert_ids), dimension=scores.ndim - 1, num_keys=1, is_stable=True)
    weights, indices = -neg_sorted[..., :k], ids_sorted[..., :k]
    if k > 1 and norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return Routing(scores, weights, indices)


# ----------------------------------------------------------------------------------------------- balance losses
def expert_balance_loss(scores: Array, indices: Array, alpha: float, seq_aux: bool) -> Array:
    """The reference's expert-level balance loss for one MoE layer.

    scores [b, t, e] (float32 softmax), indices [b, t, k] (greedy top-k, before any dropping).
    ``seq_aux``: ``alpha * mean_b sum_e ce[b, e] * mean_t scores[b, t, e]`` with ``ce[b, e]`` the number of
    choices of sequence b that picked e, over ``t * k / e``. Otherwise ``alpha * sum_e P_e * f_e`` over the whole
    batch with ``f_e = E * share of choices`` and ``P_e = mean score``. Gradients flow only through ``scores``.
    """
    b, t, n = scores.shape
    k = indices.shape[-1]
    counts = jax.nn.one_hot(indices, n, dtype=jnp.float32).sum(axis=2)  # [b, t, e]
    if seq_aux:
        ce = counts.sum(axis=1) / (t * k / n)  # [b, e]
        return alpha * jnp.mean(jnp.sum(ce * scores.mean(axis=1), axis=-1))
    f = n * counts.sum(axis=(0, 1)) / (b * t * k)  # [e]
    p = scores.mean(axis=(0, 1))  # [e]
    return alpha * jnp.sum(p * f)


def device_balance_loss(scores: Array, indices: Array, alpha: float, groups: int) -> Array:
    """The paper's device-level balance loss: experts split into ``groups`` contiguous device groups;
    ``alpha * sum_d mean_{e in d}(f_e) * sum_{e in d}(P_e)`` with f and P as in the batch-level expert loss."""
    b, t, n = scores.shape
    k = indices.shape[-1]
    counts = jax.nn.one_hot(indices, n, dtype=jnp.float32).sum(axis=(0, 1, 2))  # [e]
    f = n * counts / (b * t * k)
    p = scores.mean(axis=(0, 1))
    f_d = f.reshape(groups, n // groups).mean(axis=-1)
    p_d = p.reshape(groups, n // groups).sum(axis=-1)
    return alpha * jnp.sum(f_d * p_d)


# ----------------------------------------------------------------------------------------------- dispatch
def group_size_for(seq_len: int, moe_group_size: int) -> int:
    """Tokens per group: ``moe_group_size``, or the whole sequence when it is shorter."""
    return min(moe_group_size, seq_len)


def dispatch_tensors(
    indices: Array, weights: Array, valid: Array, n_experts: int, cap: int, dtype=jnp.float32
) -> tuple[Array, Array, Array, Array]:
    """Build the one-hot dispatch and gate-weighted combine tensors for grouped tokens.

    Args:
      indices: [g, s, k] chosen experts; weights: [g, s, k] their gate weights; valid: [g, s] bool, tokens that
        may take slots (padding never does).
      n_experts: e; cap: c, slots per expert and group; dtype: dtype of the combine tensor.
    Returns:
      dispatch [g, s, e, c] (bool), combine [g, s, e, c] (``dtype``: the gate weight where dispatch is set),
      assigned [g, s, e] (bool, before dropping), kept [g, s, e] (bool).
    """
    choice = jax.nn.one_hot(indices, n_experts, dtype=jnp.int32)  # [g, s, k, e]
    assigned = (choice.sum(axis=2) > 0) & valid[..., None]  # [g, s, e]; an expert appears at most once per token
    gate = jnp.einsum("gske,gsk->gse", choice.astype(weights.dtype), weights)  # [g, s, e]
    # Slot of each assignment: number of earlier tokens in the group routed to the same expert.
    slot = jnp.cumsum(assigned.astype(jnp.int32), axis=1) - 1  # [g, s, e]
    kept = assigned & (slot < cap)
    dispatch = jax.nn.one_hot(jnp.where(kept, slot, -1), cap, dtype=jnp.bool_)  # [g, s, e, c]; -1 -> all zero
    combine = dispatch.astype(dtype) * gate.astype(dtype)[..., None]
    return dispatch, combine, assigned, kept


class MoEGate(nnx.Module):
    """Router: logits ``x @ W`` in float32 ([h, e] kernel; HF ``mlp.gate.weight`` is its transpose [e, h])."""

    def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.config = config
        self.kernel = make_param(
            rngs,
            (config.hidden_size, config.n_routed_experts),
            ("embed", "router"),
            jnp.dtype(config.options.param_dtype),
            std=config.options.init_std,
            stack=stack,
        )

    def __call__(self, x: Array) -> Routing:
        # float32 routing: a bf16 logit can flip a near-tie top-k choice, and the softmax feeds the balance loss.
        logits = jnp.einsum("...h,he->...e", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        return route(logits, self.config.num_experts_per_tok, self.config.norm_topk_prob)


class RoutedExperts(nnx.Module):
    """``n_routed_experts`` SwiGLU experts as stacked kernels: ``w_gate``/``w_up`` [e, h, i], ``w_down`` [e, i, h]."""

    def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        pd, std = jnp.dtype(config.options.param_dtype), config.options.init_std
        self.w_gate = make_param(rngs, (e, h, i), ("expert", "embed", "expert_mlp"), pd, std=std, stack=stack)
        self.w_up = make_param(rngs, (e, h, i), ("expert", "embed", "expert_mlp"), pd, std=std, stack=stack)
        self.w_down = make_param(rngs, (e, i, h), ("expert", "expert_mlp", "embed"), pd, std=std, stack=stack)

    def __call__(self, x_e: Array) -> Array:
        """Dispatched tokens [e, g, c, h] -> expert outputs [e, g, c, h]."""
        dt = x_e.dtype
        gate = jnp.einsum("egch,ehi->egci", x_e, self.w_gate[...].astype(dt))
        up = jnp.einsum("egch,ehi->egci", x_e, self.w_up[...].astype(dt))
        act = jax.nn.silu(gate) * up
        act = constrain(act, ("act_expert", "act_expert_group", "act_capacity", "act_expert_mlp"))
        return jnp.einsum("egci,eih->egch", act, self.w_down[...].astype(dt))


class MoEOutput(NamedTuple):
    out: Array  # [b, t, h]
    aux_loss: Array  # scalar float32 (0 outside training)
    metrics: MoEMetrics


class MoEBlock(nnx.Module):
    """Routed experts (dispatched by one of `DISPATCHES`, see the module docstring) plus the fused shared experts.

    ``y = sum_j w_j * Expert_{idx_j}(x) + Shared(x)``. The shared experts are one SwiGLU MLP of width
    ``moe_intermediate_size * n_shared_experts`` (absent when that is 0 or None).
    """

    def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.config = config
        self.gate = MoEGate(config, rngs=rngs, stack=stack)
        self.experts = RoutedExperts(config, rngs=rngs, stack=stack)
        if config.shared_intermediate_size > 0:
            self.shared_experts = MLP(config, config.shared_intermediate_size, rngs=rngs, stack=stack)
        else:
            self.shared_experts = None

    def __call__(self, x: Array, token_mask: Array | None = None, *, training: bool = False) -> MoEOutput:
        """x [b, t, h]; token_mask [b, t] (nonzero = real token; padding takes no expert slots)."""
        c = self.config
        b, t, _ = x.shape
        routing = self.gate(x)  # [b, t, e], [b, t, k], [b, t, k]

        aux = jnp.zeros((), jnp.float32)
        if training and c.aux_loss_alpha > 0:
            aux = aux + expert_balance_loss(routing.scores, routing.indices, c.aux_loss_alpha, c.seq_aux)
        if training and c.options.device_balance_alpha > 0:
            aux = aux + device_balance_loss(
                routing.scores, routing.indices, c.options.device_balance_alpha, c.options.device_balance_groups
            )

        valid = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
        dispatch = DISPATCHES[dispatch_mode(c, b * t, training)]
        y, stats = dispatch(self.experts, x, routing, valid, c, training)

        if self.shared_experts is not None:
            y = y + self.shared_experts(x)

        n_assigned = jnp.sum(stats.assigned)
        metrics = MoEMetrics(
            dropped_fraction=1.0 - stats.kept / jnp.maximum(n_assigned, 1.0),
            expert_load=stats.assigned / jnp.maximum(n_assigned, 1.0),
        )
        return MoEOutput(y, aux, metrics)


# ----------------------------------------------------------------------------------------------- dispatch paths
class DispatchStats(NamedTuple):
    """What a dispatch path reports for `MoEMetrics`: ``assigned`` [e] (float32, assignments of real tokens routed
    to each expert, before dropping) and ``kept`` (float32 scalar, how many of them were computed)."""

    assigned: Array
    kept: Array


def dispatch_mode(config: DeepseekConfig, n_tokens: int, training: bool) -> str:
    """The dispatch path `MoEBlock` takes for ``n_tokens`` tokens (``b * t``, static): ``options.moe_dispatch``, or
    for "auto" "capacity" when the mode's capacity factor is set, else "gather" when ``n_tokens * k < e``, else
    "dropless"."""
    mode = config.options.moe_dispatch
    if mode != "auto":
        return mode
    if config.capacity_factor(training) is not None:
        return "capacity"
    return "gather" if n_tokens * config.num_experts_per_tok < config.n_routed_experts else "dropless"


def capacity_dispatch(
    experts: RoutedExperts, x: Array, routing: Routing, valid: Array, config: DeepseekConfig, training: bool
) -> tuple[Array, DispatchStats]:
    """The capacity-bucketed einsum path: x [b, t, h] -> y [b, t, h] (routed experts only). Tokens are cut into
    groups of ``s``; each expert has ``c`` slots per group (`capacity`); assignments beyond them are dropped."""
    c = config
    b, t, h = x.shape
    e, k = c.n_routed_experts, c.num_experts_per_tok
    s = group_size_for(t, c.options.moe_group_size)
    t_pad = math.ceil(t / s) * s
    indices, weights, xg = routing.indices, routing.weights, x
    if t_pad != t:
        pad = ((0, 0), (0, t_pad - t))
        valid = jnp.pad(valid, pad)
        indices = jnp.pad(indices, (*pad, (0, 0)))
        weights = jnp.pad(weights, (*pad, (0, 0)))
        xg = jnp.pad(x, (*pad, (0, 0)))
    g = b * t_pad // s
    cap = capacity(s, k, e, c.capacity_factor(training), c.options.min_capacity)
    xg = constrain(xg.reshape(g, s, h), ("act_group", None, "act_embed"))  # [g, s, h]
    dispatch, combine, assigned, kept = dispatch_tensors(
        indices.reshape(g, s, k), weights.reshape(g, s, k), valid.reshape(g, s), e, cap, x.dtype
    )

    # Dispatch and combine run where the groups are (both einsums local); only the expert computation sees the
    # expert-sharded layout, and moving into and out of it is an all-to-all over the 'expert' mesh axis.
    # Without the group-layout constraints on x_e / y_e, XLA may all-gather tokens and all-reduce outputs.
    dt = x.dtype
    x_e = jnp.einsum("gsec,gsh->egch", dispatch.astype(dt), xg)  # [e, g, c, h]
    x_e = constrain(x_e, (None, "act_group", "act_capacity", "act_embed"))
    x_e = constrain(x_e, ("act_expert", "act_expert_group", "act_capacity", "act_embed"))
    y_e = experts(x_e)  # [e, g, c, h]
    y_e = constrain(y_e, ("act_expert", "act_expert_group", "act_capacity", "act_embed"))
    y_e = constrain(y_e, (None, "act_group", "act_capacity", "act_embed"))  # back to the groups' layout
    y = jnp.einsum("gsec,egch->gsh", combine, y_e)  # [g, s, h]
    y = constrain(y, ("act_group", None, "act_embed"))
    y = y.reshape(b, t_pad, h)[:, :t]  # [b, t, h]
    stats = DispatchStats(
        assigned=jnp.sum(assigned, axis=(0, 1), dtype=jnp.float32), kept=jnp.sum(kept, dtype=jnp.float32)
    )
    return y, stats


# Bucket sizes of the dropless path, as multiples of the even share ceil(N / e) of the N assignments.
DROPLESS_LADDER = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)


def dropless_capacities(n_assign: int, n_tokens: int, n_experts: int) -> tuple[int, ...]:
    """The compiled bucket sizes of the dropless path, increasing: ``ceil(m * ceil(N / e))`` for the multiples ``m``
    of `DROPLESS_LADDER`, capped at ``n_tokens`` (an expert is picked at most once per token, so no expert ever
    has more assignments than there are tokens), which is always the last rung."""
    base = -(-n_assign // n_experts)
    rungs = {min(n_tokens, math.ceil(m * base)) for m in DROPLESS_LADDER}
    return tuple(sorted(rungs | {n_tokens}))


def _swiglu_experts(x_ech: Array, w_gate: Array, w_up: Array, w_down: Array) -> Array:
    """Buckets [e, c, h] through stacked SwiGLU experts (``w_gate``/``w_up`` [e, h, i], ``w_down`` [e, i, h])."""
    dt = x_ech.dtype
    gate = jnp.einsum("ech,ehi->eci", x_ech, w_gate.astype(dt))
    up = jnp.einsum("ech,ehi->eci", x_ech, w_up.astype(dt))
    act = constrain(jax.nn.silu(gate) * up, ("act_expert", "act_capacity", "act_expert_mlp"))
    return jnp.einsum("eci,eih->ech", act, w_down.astype(dt))


def dropless_dispatch(
    experts: RoutedExperts, x: Array, routing: Routing, valid: Array, config: DeepseekConfig, training: bool
) -> tuple[Array, DispatchStats]:
    """The exact sorted-bucket path: x [b, t, h] -> y [b, t, h] (routed experts only); nothing is dropped.

    The N = b*t*k (token, choice) assignments are stably sorted by expert (padding tokens go to a sentinel expert
    ``e`` that is never computed), expert ``j``'s assignments fill rows ``0 .. count_j - 1`` of its bucket, and the
    experts run as batched matmuls over buckets [e, C, h]. C is the smallest rung of `dropless_capacities` that
    holds the busiest expert, chosen at run time by `jax.lax.switch`, so every rung gives the same result and a
    balanced load costs about the useful work. Each rung is rematerialised in the backward pass: otherwise the
    switch would keep the residuals of every rung.
    """
    del training
    b, t, h = x.shape
    e, k = config.n_routed_experts, config.num_experts_per_tok
    n_tok, n = b * t, b * t * k
    x_flat = x.reshape(n_tok, h)  # [b*t, h]
    expert_of = jnp.where(valid[..., None], routing.indices, e).reshape(n)  # [N]; e = padding
    weight_of = jnp.where(valid[..., None], routing.weights, 0.0).reshape(n).astype(x.dtype)  # [N]
    order = jnp.argsort(expert_of, stable=True)  # [N] sorted rank -> assignment
    counts = jnp.zeros((e + 1,), jnp.int32).at[expert_of].add(1)  # [e + 1]
    starts = jnp.cumsum(counts) - counts  # [e + 1], first sorted rank of each expert
    row_sorted = jnp.arange(n, dtype=jnp.int32) - starts[expert_of[order]]  # [N] row of each sorted assignment
    row_of = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted)  # [N] row of each assignment in its bucket
    w_gate, w_up, w_down = experts.w_gate[...], experts.w_up[...], experts.w_down[...]
    rungs = dropless_capacities(n, n_tok, e)

    def run(cap: int):
        @jax.checkpoint
        def bucketed(x_flat, weight_of, w_gate, w_up, w_down):
            slot = starts[:e, None] + jnp.arange(cap, dtype=jnp.int32)  # [e, C] sorted rank held by each slot
            filled = jnp.arange(cap, dtype=jnp.int32) < counts[:e, None]  # [e, C]
            token = order[jnp.minimum(slot, n - 1)] // k  # [e, C]
            x_b = jnp.where(filled[..., None], x_flat[token], 0)  # [e, C, h]
            x_b = constrain(x_b, ("act_expert", "act_capacity", "act_embed"))
            y_b = _swiglu_experts(x_b, w_gate, w_up, w_down)  # [e, C, h]
            y_b = constrain(y_b, ("act_expert", "act_capacity", "act_embed"))
            # Padding assignments point at the sentinel expert: any real row will do, their weight is 0.
            y_a = y_b[jnp.minimum(expert_of, e - 1), jnp.minimum(row_of, cap - 1)]  # [N, h]
            return jnp.einsum("nkh,nk->nh", y_a.reshape(n_tok, k, h), weight_of.reshape(n_tok, k))  # [b*t, h]

        return lambda *operands: bucketed(*operands)

    rung = jnp.searchsorted(jnp.asarray(rungs, jnp.int32), jnp.max(counts[:e]), side="left")
    operands = (x_flat, weight_of, w_gate, w_up, w_down)
    if len(rungs) == 1:
        y = run(rungs[0])(*operands)
    else:
        y = jax.lax.switch(jnp.minimum(rung, len(rungs) - 1), [run(r) for r in rungs], *operands)
    assigned = counts[:e].astype(jnp.float32)
    return y.reshape(b, t, h), DispatchStats(assigned=assigned, kept=jnp.sum(assigned))


def gather_dispatch(
    experts: RoutedExperts, x: Array, routing: Routing, valid: Array, config: DeepseekConfig, training: bool
) -> tuple[Array, DispatchStats]:
    """The exact decode path: x [b, t, h] -> y [b, t, h] (routed experts only). Gathers the chosen experts'
    kernels per (token, choice), [n, k, h, i] with n = b*t, so a step reads only the ``n * k`` chosen experts'
    weights; meant for ``n * k < e`` (it materialises ``n * k`` expert kernels)."""
    del training
    b, t, h = x.shape
    e, k = config.n_routed_experts, config.num_experts_per_tok
    n_tok = b * t
    dt = x.dtype
    x_flat = x.reshape(n_tok, h)  # [n, h]
    idx = routing.indices.reshape(n_tok, k)  # [n, k]
    w = jnp.where(valid[..., None], routing.weights, 0.0).reshape(n_tok, k).astype(dt)  # [n, k]
    w_gate = experts.w_gate[...][idx].astype(dt)  # [n, k, h, i]
    w_up = experts.w_up[...][idx].astype(dt)  # [n, k, h, i]
    w_down = experts.w_down[...][idx].astype(dt)  # [n, k, i, h]
    act = jax.nn.silu(jnp.einsum("nh,nkhi->nki", x_flat, w_gate)) * jnp.einsum("nh,nkhi->nki", x_flat, w_up)
    y = jnp.einsum("nkh,nk->nh", jnp.einsum("nki,nkih->nkh", act, w_down), w)  # [n, h]
    assigned = jnp.zeros((e,), jnp.float32).at[idx].add(valid.reshape(n_tok, 1).astype(jnp.float32))
    return y.reshape(b, t, h), DispatchStats(assigned=assigned, kept=jnp.sum(assigned))


DISPATCHES = {"capacity": capacity_dispatch, "dropless": dropless_dispatch, "gather": gather_dispatch}
