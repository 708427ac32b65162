"""The loss, the jitted training step (with gradient accumulation) and the evaluation step.

All functions here are pure: parameters travel as the pure dict ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
(the layout of a checkpoint's ``params/``) and the model is rebuilt from the graph definition inside the trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (all of it is checkpointed).

    step: int32 [] optimizer steps done; params: pure dict of parameters; opt_state: optax state;
    rng: uint32 [2] key data, advanced every step (the model has no stochastic layers, but anything random added
    to the step draws from it and resumes exactly); bad_step: int32 [], the first step whose loss or gradient
    norm was not finite (-1 if none). From that step on, updates are skipped, so the parameters stay those of
    the last finite step.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    bad_step: Array


class ModelBuilder:
    """Rebuilds a `DeepseekForCausalLM` from a pure parameter dict inside a trace."""

    def __init__(self, graphdef, abstract_params: nnx.State):
        self.graphdef = graphdef
        self.abstract_params = abstract_params

    def __call__(self, params: dict):
        state = jax.tree.map(lambda x: x, self.abstract_params)  # fresh Variables, same metadata
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def chunked_nll(model, hidden: Array, targets: Array, mask: Array, chunk: int) -> tuple[Array, Array]:
    """Summed cross-entropy of ``targets`` and the number of counted tokens.

    hidden [B, T, H] (final-normed), targets [B, T] int, mask [B, T] (1 = counted). The logits are computed
    ``chunk`` positions at a time under `jax.checkpoint` inside a scan, so neither pass holds float32 logits
    larger than [B, chunk, vocab]. Returns float32 scalars (sum of ``-log p(target)`` over counted tokens, count).
    """
    b, t, h = hidden.shape
    mask = mask.astype(jnp.float32)

    def piece(hid, tgt, msk):
        logits = model.logits(hid)  # [B, c, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - picked) * msk)

    if t <= chunk:
        return piece(hidden, targets, mask), jnp.sum(mask)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, chunk, h).swapaxes(0, 1)  # [n, B, c, H]
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]
    ms = mask.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint
    def body(total, xs):
        return total + piece(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total, jnp.sum(mask)


def forward_losses(model, tokens: Array, *, training: bool, chunk: int):
    """tokens [B, T+1] -> (summed NLL, counted tokens, summed aux loss, moe metrics or None).

    Inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``; every target of packed data is a real token.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model.model(inputs, training=training)
    mask = jnp.ones(targets.shape, jnp.float32)
    nll, count = chunked_nll(model, out.hidden_states, targets, mask, chunk)
    return nll, count, out.aux_loss, out.moe_metrics


def load_imbalance(expert_load: Array) -> Array:
    """expert_load [L, E] (shares summing to 1 per layer) -> max/mean per layer [L] (1 = perfectly even)."""
    return jnp.max(expert_load, axis=-1) / jnp.mean(expert_load, axis=-1)


def make_train_step(
    build: ModelBuilder, optimizer: optax.GradientTransformation, schedule: Callable, chunk: int
) -> Callable[[TrainState, Array], tuple[TrainState, dict[str, Array]]]:
    """The training step ``(state, batch [A, B, T+1]) -> (state, metrics)`` (not yet jitted).

    The loss is ``sum NLL / (number of target tokens in the whole batch) + mean over micro-batches of the summed
    aux loss``. Gradients of the ``A`` micro-batches are accumulated in float32 by `jax.lax.scan`; since the
    token count of the whole batch divides each micro-batch's NLL, the sum of micro-batch gradients is exactly
    the gradient of the full-batch loss (up to summation order). With ``seq_aux`` (the default) the balance loss
    is a mean over sequences, so its micro-batch mean also equals the full-batch value; the batch-level variant
    (``seq_aux: false``) becomes a mean of per-micro-batch values.
    """

    def step(state: TrainState, batch: Array):
        a = batch.shape[0]
        total_tokens = jnp.float32(batch.shape[0] * batch.shape[1] * (batch.shape[2] - 1))

        def micro(grads, tokens):
            def loss_fn(params):
                model = build(params)
                nll, _, aux, moe = forward_losses(model, tokens, training=True, chunk=chunk)
                return nll / total_tokens + aux / a, (nll, aux, moe)

            (_, (nll, aux, moe)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            grads = jax.tree.map(jnp.add, grads, g)
            extras = {"nll": nll, "aux": aux}
            if moe is not None:
                extras["dropped"] = moe.dropped_fraction
                extras["load"] = moe.expert_load
            return grads, extras

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        if a == 1:
            grads, extras = micro(zeros, batch[0])
            extras = jax.tree.map(lambda x: x[None], extras)
        else:
            grads, extras = jax.lax.scan(micro, zeros, batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        lm_loss = jnp.sum(extras["nll"]) / total_tokens
        aux_loss = jnp.mean(extras["aux"])
        loss = lm_loss + aux_loss
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.bad_step < 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        bad_step = jnp.where((state.bad_step < 0) & ~ok, state.step + 1, state.bad_step)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng), 1)[0]),
            bad_step=bad_step.astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "lm_loss": lm_loss,
            "aux_loss": aux_loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
        }
        if "dropped" in extras:
            metrics["dropped_fraction"] = jnp.mean(extras["dropped"], axis=0)  # [L_moe]
            metrics["load_imbalance"] = load_imbalance(jnp.mean(extras["load"], axis=0))  # [L_moe]
        return new_state, metrics

    return step


def make_eval_step(build: ModelBuilder, chunk: int) -> Callable[[Any, Array], tuple[Array, Array]]:
    """``(params, tokens [1, B, T+1]) -> (summed NLL, token count)`` in evaluation mode (no-drop MoE by default).
    The leading dimension of one keeps the batch layout of the training step."""

    def eval_step(params, tokens):
        nll, count, _, _ = forward_losses(build(params), tokens[0], training=False, chunk=chunk)
        return nll, count

    return eval_step
