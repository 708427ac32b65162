"""Logical axis names and the one rules table that maps them onto mesh axes; the sharding context and `constrain`.

Modules name the dimensions of parameters (``embed``, ``mlp``, ``expert`` ...) and activations (``act_batch``,
``act_expert`` ...). This module alone knows the mesh axes ``data``, ``fsdp``, ``expert`` and ``tensor``; the
table `DEFAULT_RULES` maps one onto the other and can be overridden per config (``options.logical_axis_rules``).

It imports nothing of the model, so that the model's modules (``layers``, ``moe``, ``model``) and the settings can
import it. Meshes, parameter shardings, born-sharded models and batch placement, which need the model, are in
`deepseekmoe_jax.sharding`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),  # the leading stacked (scanned) dimension of per-layer parameters
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

LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)

# The mesh used when a config has no ``mesh:`` section: every device on ``fsdp`` (parameters and batch sharded over
# all devices, ZeRO-3 style); on one device this is the trivial mesh.
DEFAULT_MESH = {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}


class ShardingError(ValueError):
    """A mesh or rules table that cannot shard the model; the message says which axis and why."""


# ----------------------------------------------------------------------------------------------- rules
def rule_targets(target: Any) -> tuple[str, ...]:
    """A rule's right-hand side as a tuple of mesh axis names (``None`` -> ``()``)."""
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def mesh_size(mesh_shape: Mapping[str, int], axes: Sequence[str]) -> int:
    """The number of devices along ``axes`` of a mesh of shape ``mesh_shape`` (axes it lacks count as 1)."""
    return math.prod(mesh_shape.get(a, 1) for a in axes)


def _check_rule(name: str, target: Any) -> Any:
    if target is not None and not isinstance(target, str | list | tuple):
        raise ShardingError(
            f"logical axis rule {name!r} -> {target!r}: expected null, a mesh axis name or a list of them"
        )
    targets = rule_targets(target)
    bad = [t for t in targets if t not in MESH_AXES]
    if bad:
        raise ShardingError(
            f"logical axis rule {name!r} -> {target!r}: unknown mesh axis {bad[0]!r}; mesh axes are {MESH_AXES}"
        )
    if len(set(targets)) != len(targets):
        raise ShardingError(f"logical axis rule {name!r} -> {target!r} names a mesh axis twice")
    return None if not targets else (targets[0] if len(targets) == 1 else targets)


def rules_dict(
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
    overrides: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The rules table as a validated dict: `DEFAULT_RULES`, or ``rules`` (a full replacement), with ``overrides``
    (per logical name) applied.

    Each value is ``None`` (replicated), a mesh axis name, or a tuple of mesh axis names. An override of a logical
    name that the table does not have, or a value naming an unknown mesh axis, raises `ShardingError` (a typo must
    not silently leave a tensor replicated).
    """
    base = DEFAULT_RULES if rules is None else rules
    table = dict(base.items() if isinstance(base, Mapping) else base)
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        for name, target in items:
            if name not in table:
                raise ShardingError(
                    f"logical_axis_rules override {name!r}: no such logical axis; known axes are {sorted(table)}"
                )
            table[name] = target
    return {str(name): _check_rule(str(name), target) for name, target in table.items()}


def rules_for(config) -> dict[str, Any]:
    """The rules table for a config: `DEFAULT_RULES` plus ``options.logical_axis_rules`` overrides."""
    return rules_dict(overrides=config.options.logical_axis_rules)


def logical_to_spec(
    axes: Sequence[str | None],
    rules: Mapping[str, Any],
    mesh_axis_names: Sequence[str] = MESH_AXES,
    mesh_shape: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a `PartitionSpec`.

    Mesh axes of size 1 are dropped (they shard nothing), as are mesh axes the mesh does not have. A mesh axis
    used by two dimensions of one array is an error (`ShardingError`), never silently resolved.

    ``shape`` (activations only): a dimension keeps the longest prefix of its mesh axes whose total size divides
    the dimension, so a constraint stays valid for, e.g., a batch of one in generation. Parameters are checked
    up front by `deepseekmoe_jax.sharding.check_mesh_fits` and are never given a shape here.
    """
    if shape is not None and len(shape) != len(axes):
        raise ShardingError(f"logical axes {tuple(axes)} do not match an array of rank {len(shape)} {tuple(shape)}")
    used: dict[str, str] = {}
    out = []
    for dim, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; add it to options.logical_axis_rules")
        kept: list[str] = []
        for t in rule_targets(rules[name]):
            if t not in mesh_axis_names:
                continue
            size = 1 if mesh_shape is None else mesh_shape.get(t, 1)
            if mesh_shape is not None and size == 1:
                continue
            if t in used:
                raise ShardingError(
                    f"mesh axis {t!r} is used by both logical axes {used[t]!r} and {name!r} of one "
                    f"array {tuple(axes)}; change options.logical_axis_rules"
                )
            if shape is not None and mesh_shape is not None and shape[dim] % (mesh_size(mesh_shape, kept) * size):
                break
            used[t] = name
            kept.append(t)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


# ----------------------------------------------------------------------------------------------- context
@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """The active mesh and rules table (see `use_mesh`)."""

    mesh: Mesh
    rules: Mapping[str, Any]

    def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        return logical_to_spec(axes, self.rules, self.mesh.axis_names, dict(self.mesh.shape), shape)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))


_state = threading.local()


def current() -> ShardingContext | None:
    """The active `ShardingContext` (set by `use_mesh`), or None when running unsharded."""
    return getattr(_state, "ctx", None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Any] | Sequence | None = None) -> Iterator[ShardingContext]:
    """Activate ``mesh`` with logical ``rules`` (default `DEFAULT_RULES`; pass ``rules_for(config)`` to honour a
    config's overrides) for model construction and tracing.

    Inside, `constrain` annotates activations and `jax.set_mesh` makes the mesh current. Trace (first call or
    ``.lower``) jitted functions inside this context; `deepseekmoe_jax.sharding.jit_step` does that for you.
    """
    ctx = ShardingContext(mesh, rules_dict(rules))
    prev = current()
    _state.ctx = ctx
    try:
        with jax.set_mesh(mesh):
            yield ctx
    finally:
        _state.ctx = prev


def sharded() -> bool:
    """True inside `use_mesh` with a mesh of more than one device (code being traced for a sharded run)."""
    ctx = current()
    return ctx is not None and ctx.mesh.size > 1


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`jax.lax.with_sharding_constraint` of ``x`` by logical ``axes``, resolved against the mesh being traced for.

    The mesh and rules are those of `use_mesh`; without it, the mesh that JAX's own context holds (``jax.set_mesh``)
    with `DEFAULT_RULES`. With neither, a value traced for several devices (its abstract type names a mesh of more
    than one device: the function was called with sharded arrays or shardings) raises `ShardingError` rather than
    drop the constraint; a single-device trace, and eager (untraced) execution, leave ``x`` as it is. So does a
    one-device mesh. (Host arrays passed to a ``jax.jit`` with ``in_shardings`` carry no mesh in their abstract
    type, so such a trace looks like a single-device one: trace it under `use_mesh` or ``jax.set_mesh``.)

    A dimension that a rule's mesh axes do not divide keeps only the axes that do (see `logical_to_spec`).
    """
    ctx = current()
    if ctx is not None:
        if ctx.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, ctx.sharding(axes, x.shape))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        if mesh.size == 1:
            return x
        # A bare PartitionSpec is resolved by JAX against the context mesh.
        spec = logical_to_spec(axes, rules_dict(), mesh.axis_names, dict(mesh.shape), x.shape)
        return jax.lax.with_sharding_constraint(x, spec)
    if isinstance(x, jax.core.Tracer):
        traced_for = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", mesh)
        if traced_for.size > 1:
            raise ShardingError(
                f"constrain({tuple(axes)}) while tracing for {traced_for.size} devices (mesh "
                f"{dict(traced_for.shape)}) with no mesh set: trace the function inside "
                "deepseekmoe_jax.partitioning.use_mesh(mesh, rules_for(config)) (sharding.jit_step does this) or "
                "jax.set_mesh(mesh), so that its activations are sharded as the rules say"
            )
    return x
