"""Optimizer and learning-rate schedule (the paper's recipe, from optax).

AdamW with beta1 0.9, beta2 0.95, decoupled weight decay 0.1, global-norm clipping at 1.0 and a linear warmup
followed by a step decay (x0.316 at 80% and at 90% of the steps). Weight decay is applied to every matrix,
including the embedding and the LM head (the paper names no exceptions); RMSNorm weights and biases are exempt,
as is customary, because decaying a norm's scale towards zero only fights the normalisation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from deepseekmoe_jax.train.settings import TrainSettings


def make_schedule(settings: TrainSettings) -> Callable[[jax.Array | int], jax.Array]:
    """The learning rate for the update with (0-based) index ``t``.

    * warmup (``t < W``): ``peak * (t + 1) / W``, so the first update already moves and update ``W - 1`` uses the
      peak;
    * ``step``: ``peak * decay_factor ** n(t)`` with ``n(t)`` the number of decay points ``p`` with
      ``t >= floor(p * steps)`` (the paper: x0.316 from 80% and again from 90% of the steps);
    * ``cosine``: from the peak at ``t = W`` down to ``min_lr_ratio * peak`` at ``t = steps - 1``;
    * ``constant``: the peak.
    """
    s = settings
    peak, warmup, total = float(s.learning_rate), int(s.warmup_steps), int(s.steps)
    boundaries = [int(p * total) for p in s.decay_points]

    def schedule(t):
        t = jnp.asarray(t, jnp.int32)
        if s.schedule == "step":
            n = sum((t >= b).astype(jnp.float32) for b in boundaries) if boundaries else jnp.float32(0)
            after = peak * jnp.power(jnp.float32(s.decay_factor), n)
        elif s.schedule == "cosine":
            span = max(total - 1 - warmup, 1)
            progress = jnp.clip((t - warmup).astype(jnp.float32) / span, 0.0, 1.0)
            after = peak * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        else:
            after = jnp.float32(peak)
        if warmup == 0:
            return jnp.asarray(after, jnp.float32)
        ramp = peak * (t + 1).astype(jnp.float32) / warmup
        return jnp.where(t < warmup, ramp, after).astype(jnp.float32)

    return schedule


def decay_mask(abstract_params: nnx.State) -> dict:
    """A pure-dict tree of bools (same layout as the parameters' pure dict): True where weight decay applies.

    Exempt: parameters whose logical axes include ``norm`` (RMSNorm weights) and attention biases.
    """
    flat = {}
    for path, var in nnx.to_flat_state(abstract_params):
        axes = var.get_metadata().get("logical_axes") or ()
        is_norm = "norm" in axes
        is_bias = str(path[-1]).endswith("bias")
        flat[tuple(path)] = not (is_norm or is_bias)
    return traverse_util.unflatten_dict(flat)


def make_optimizer(settings: TrainSettings, mask: dict | None = None) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` then AdamW with the schedule of `make_schedule` and the decay ``mask``."""
    s = settings
    adamw = optax.adamw(
        learning_rate=make_schedule(s), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay, mask=mask
    )
    if s.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(s.grad_clip), adamw)
    return adamw
