"""Logical axis names, the rules that map them onto mesh axes, and sharding helpers.

Modules name the dimensions of parameters (``embed``, ``mlp``, ``expert`` ...) and activations (``act_batch``,
``act_expert`` ...). This module alone knows the mesh axes ``data``, ``fsdp``, ``expert`` and ``tensor``; the
table `DEFAULT_RULES` maps one onto the other and can be overridden per config (``options.logical_axis_rules``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("router", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_group", ("data", "fsdp", "expert")),  # MoE token groups before dispatch
    ("act_expert_group", ("data", "fsdp")),  # MoE token groups after dispatch (experts hold the 'expert' axis)
    ("act_expert", "expert"),
    ("act_capacity", None),
    ("act_expert_mlp", "tensor"),
)


class ShardingError(ValueError):
    """A mesh or rules table that cannot shard the model; the message says which axis and why."""


def rules_dict(
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
    overrides: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The default rules with ``rules`` (full replacement) or ``overrides`` (per-name) applied."""
    base = dict(DEFAULT_RULES if rules is None else (rules.items() if isinstance(rules, Mapping) else rules))
    if overrides:
        base.update(overrides.items() if isinstance(overrides, Mapping) else overrides)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in base.items()}


def logical_to_spec(
    axes: Sequence[str | None],
    rules: Mapping[str, Any],
    mesh_axis_names: Sequence[str] = MESH_AXES,
    mesh_shape: Mapping[str, int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a `PartitionSpec`.

    Mesh axes of size 1 are dropped (they shard nothing). A mesh axis used by two dimensions of one array is an
    error (`ShardingError`), never silently resolved.
    """
    used: dict[str, str] = {}
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; add it to options.logical_axis_rules")
        target = rules[name]
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        kept = []
        for t in targets:
            if t not in mesh_axis_names:
                continue  # rules may name axes this mesh does not have
            if mesh_shape is not None and mesh_shape.get(t, 1) == 1:
                continue
            if t in used:
                raise ShardingError(
                    f"mesh axis {t!r} is used by both logical axes {used[t]!r} and {name!r} of one "
                    f"array {tuple(axes)}; change options.logical_axis_rules"
                )
            used[t] = name
            kept.append(t)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: Mapping[str, Any]

    def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
        return logical_to_spec(axes, self.rules, self.mesh.axis_names, dict(self.mesh.shape))

    def sharding(self, axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes))


_state = threading.local()


def current() -> ShardingContext | None:
    """The active `ShardingContext` (set by `use_mesh`), or None when running unsharded."""
    return getattr(_state, "ctx", None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Any] | Sequence | None = None) -> Iterator[ShardingContext]:
    """Activate ``mesh`` with logical ``rules`` for model construction and tracing.

    Inside, `constrain` annotates activations and `jax.set_mesh` makes the mesh current. Jit the step functions
    inside this context so their traces see it.
    """
    ctx = ShardingContext(mesh, rules_dict(rules) if not isinstance(rules, dict) else rules)
    prev = current()
    _state.ctx = ctx
    try:
        with jax.set_mesh(mesh):
            yield ctx
    finally:
        _state.ctx = prev


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`jax.lax.with_sharding_constraint` by logical axes; a no-op outside `use_mesh` or on one device."""
    ctx = current()
    if ctx is None or ctx.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.sharding(axes))
