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


# ----------------------------------------------------------------------------------------------- meshes
def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A device mesh with axes ``(data, fsdp, expert, tensor)``; one size may be -1 (= the remaining devices).

    Built with `jax.make_mesh` (topology-aware device order) over ``devices`` (default: all devices of all
    processes), with `AxisType.Auto` axes so XLA's sharding propagation places the collectives.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, v in sizes.items():
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise ShardingError(f"mesh axis {name}={v!r}: expected a positive integer or -1")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {free}")
    fixed = 1
    for v in sizes.values():
        fixed *= v if v != -1 else 1
    if free:
        if len(devices) % fixed:
            raise ShardingError(
                f"cannot fill mesh axis {free[0]!r}: {len(devices)} devices are not divisible by "
                f"the product {fixed} of the other axes {sizes}"
            )
        sizes[free[0]] = len(devices) // fixed
    total = 1
    for v in sizes.values():
        total *= v
    if total != len(devices):
        raise ShardingError(
            f"mesh {sizes} needs {total} devices but {len(devices)} are available; the product of "
            "the axis sizes must equal the device count (use -1 for one axis to take the rest)"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def check_mesh_fits(config, mesh: Mesh) -> None:
    """Raise `ShardingError` if ``config`` cannot be sharded over ``mesh`` (experts over ``expert``, heads over
    ``tensor``)."""
    shape = dict(mesh.shape)
    e, t = shape.get("expert", 1), shape.get("tensor", 1)
    if config.is_moe and config.n_routed_experts % e:
        raise ShardingError(
            f"n_routed_experts={config.n_routed_experts} is not divisible by the mesh's expert axis "
            f"({e}); choose an expert axis size that divides it"
        )
    if config.num_key_value_heads % t or config.num_attention_heads % t:
        raise ShardingError(
            f"attention heads ({config.num_attention_heads} query, {config.num_key_value_heads} "
            f"key/value) are not divisible by the mesh's tensor axis ({t})"
        )


def rules_for(config) -> dict[str, Any]:
    """The rules table for a config: defaults plus ``options.logical_axis_rules`` overrides."""
    return rules_dict(overrides=config.options.logical_axis_rules)


def param_specs(state, rules: Mapping[str, Any], mesh: Mesh):
    """PartitionSpecs for every variable of an (abstract) NNX state, from its ``logical_axes`` metadata."""
    from flax import nnx

    def spec(v):
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        if axes is None:
            return PartitionSpec()
        return logical_to_spec(axes, rules, mesh.axis_names, dict(mesh.shape))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, rules: Mapping[str, Any], mesh: Mesh):
    """`NamedSharding` for every variable of an (abstract) NNX state."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(state, rules, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def create_sharded_model(config, mesh: Mesh, *, seed: int = 0, rules: Mapping[str, Any] | None = None):
    """Build a `DeepseekForCausalLM` whose parameters are born sharded over ``mesh`` (no full copy anywhere).

    The initialiser runs under `jax.jit` with ``out_shardings`` from the logical-axis rules, so each device only
    ever materialises its own shard.
    """
    from flax import nnx

    from deepseekmoe_jax.model import DeepseekForCausalLM

    check_mesh_fits(config, mesh)
    rules = rules if rules is not None else rules_for(config)
    abstract = nnx.eval_shape(lambda: DeepseekForCausalLM(config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, rules, mesh)

    @jax.jit
    def init():
        model = DeepseekForCausalLM(config, rngs=nnx.Rngs(seed))
        return nnx.state(model)

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
