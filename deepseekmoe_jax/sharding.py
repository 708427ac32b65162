"""Logical axis names, the rules that map them onto mesh axes, meshes, and sharded jit helpers.

Modules name the dimensions of parameters (``embed``, ``mlp``, ``expert`` ...) and activations (``act_batch``,
``act_expert`` ...). This module alone knows the mesh axes ``data``, ``fsdp``, ``expert`` and ``tensor``; the
table `DEFAULT_RULES` maps one onto the other and can be overridden per config (``options.logical_axis_rules``).

Typical use (one process or many; see ``docs/sharding.md``)::

    mesh = sharding.mesh_from_config({"data": 1, "fsdp": -1, "expert": 4, "tensor": 1}, config=config)
    model = sharding.create_sharded_model(config, mesh)            # parameters born sharded
    graphdef, params = nnx.split(model)
    step = sharding.jit_step(train_step, mesh, sharding.param_shardings(params, rules, mesh), rules=rules)
    params, metrics = step(params, sharding.shard_batch(batch, mesh, rules))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
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
def _targets(target: Any) -> tuple[str, ...]:
    """A rule's right-hand side as a tuple of mesh axis names (``None`` -> ``()``)."""
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def _check_rule(name: str, target: Any) -> Any:
    if target is not None and not isinstance(target, str | list | tuple):
        raise ShardingError(
            f"logical axis rule {name!r} -> {target!r}: expected null, a mesh axis name or a list of them"
        )
    targets = _targets(target)
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


def _mesh_size(mesh_shape: Mapping[str, int], axes: Sequence[str]) -> int:
    return math.prod(mesh_shape.get(a, 1) for a in axes)


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
    up front by `check_mesh_fits` and are never given a shape here.
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
        for t in _targets(rules[name]):
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
            if shape is not None and mesh_shape is not None and shape[dim] % (_mesh_size(mesh_shape, kept) * size):
                break
            used[t] = name
            kept.append(t)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def rules_for(config) -> dict[str, Any]:
    """The rules table for a config: `DEFAULT_RULES` plus ``options.logical_axis_rules`` overrides."""
    return rules_dict(overrides=config.options.logical_axis_rules)


def _as_rules(rules) -> dict[str, Any]:
    if rules is None:
        return rules_dict()
    return rules_dict(rules)


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
    ``.lower``) jitted functions inside this context; `jit_step` does that for you.
    """
    ctx = ShardingContext(mesh, _as_rules(rules))
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
    """`jax.lax.with_sharding_constraint` by logical axes; a no-op outside `use_mesh` or on one device.

    A dimension that a rule's mesh axes do not divide keeps only the axes that do (see `logical_to_spec`).
    """
    ctx = current()
    if ctx is None or ctx.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.sharding(axes, x.shape))


# ----------------------------------------------------------------------------------------------- meshes
def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, devices=None, config=None) -> Mesh:
    """A device mesh with axes ``(data, fsdp, expert, tensor)``; one size may be -1 (= the remaining devices).

    Built with `jax.make_mesh` (topology-aware device order) over ``devices`` (default: all devices of all
    processes), with `AxisType.Auto` axes so XLA's sharding propagation places the collectives. ``tensor`` is the
    innermost axis (neighbouring devices), ``data`` the outermost (across hosts first).

    Raises `ShardingError` when the sizes do not multiply to the device count, and, given ``config``, when the
    model cannot be laid out on the mesh (`check_mesh_fits`).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or (v < 1 and v != -1):
            raise ShardingError(f"mesh axis {name}={v!r}: expected a positive integer or -1")
        sizes[name] = int(v)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ShardingError(
                f"cannot fill mesh axis {free[0]!r}: {len(devices)} devices are not divisible by "
                f"the product {fixed} of the other axes {sizes}"
            )
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ShardingError(
            f"mesh {sizes} needs {total} devices but {len(devices)} are available; the product of "
            "the axis sizes must equal the device count (use -1 for one axis to take the rest)"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if config is not None:
        check_mesh_fits(config, mesh)
    return mesh


def mesh_from_config(mesh_config: Mapping[str, Any] | None = None, *, devices=None, config=None) -> Mesh:
    """The mesh of a project config's ``mesh:`` section, e.g. ``{data: 1, fsdp: -1, expert: 8, tensor: 1}``.

    Missing axes default to 1; ``None`` (no section) means `DEFAULT_MESH` (every device on ``fsdp``). Unknown
    keys raise `ShardingError`. Given ``config``, the model is checked against the mesh (`check_mesh_fits`).
    """
    if mesh_config is None:
        mesh_config = DEFAULT_MESH
    if not isinstance(mesh_config, Mapping):
        raise ShardingError(f"mesh section {mesh_config!r}: expected a mapping of {MESH_AXES} to sizes")
    unknown = sorted(set(mesh_config) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"mesh section: unknown axis name(s) {unknown}; the mesh axes are {MESH_AXES}")
    sizes = {a: mesh_config.get(a, 1) for a in MESH_AXES}
    return make_mesh(**sizes, devices=devices, config=config)


def key_path(path) -> tuple[str, ...]:
    """A pytree key path (dict keys, sequence indices, attribute names) as a tuple of strings."""
    return tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def _path_str(path) -> str:
    return "/".join(key_path(path))


def abstract_param_state(config):
    """The model's parameters as an abstract NNX state (shapes, dtypes, logical axes), without allocating."""
    from flax import nnx

    from deepseekmoe_jax.model import DeepseekForCausalLM

    abstract = nnx.eval_shape(lambda: DeepseekForCausalLM(config, rngs=nnx.Rngs(0)))
    return nnx.state(abstract, nnx.Param)


def check_mesh_fits(config, mesh: Mesh, rules: Mapping[str, Any] | None = None, abstract_params=None) -> None:
    """Raise `ShardingError` if ``config`` cannot be laid out on ``mesh`` under ``rules`` (default: the config's).

    Checks, with messages naming the numbers: routed experts divisible by the mesh axes of ``expert`` (and of the
    dispatched activations), query and key/value heads divisible by the mesh axes of the head dimensions, and then
    every parameter dimension divisible by the mesh axes its logical name maps to (naming the parameter).
    ``abstract_params`` (an abstract ``nnx.State`` of the parameters) saves re-tracing the model.
    """
    from flax import nnx

    rules = rules_for(config) if rules is None else _as_rules(rules)
    shape = dict(mesh.shape)

    def size_of(logical: str) -> tuple[int, tuple[str, ...]]:
        axes = tuple(a for a in _targets(rules.get(logical)) if a in shape and shape[a] > 1)
        return _mesh_size(shape, axes), axes

    def describe(axes):
        return " x ".join(f"{a}={shape[a]}" for a in axes)

    if config.is_moe:
        for logical in ("expert", "act_expert"):
            n, axes = size_of(logical)
            if config.n_routed_experts % n:
                raise ShardingError(
                    f"n_routed_experts={config.n_routed_experts} is not divisible by the mesh's expert axis "
                    f"({describe(axes)}, from the rule for {logical!r}); choose an expert axis size that divides it"
                )
    for logical, count, what in (
        ("q_heads", config.num_attention_heads, "num_attention_heads"),
        ("kv_heads", config.num_key_value_heads, "num_key_value_heads"),
        ("act_heads", config.num_attention_heads, "num_attention_heads"),
        ("act_kv_heads", config.num_key_value_heads, "num_key_value_heads"),
    ):
        n, axes = size_of(logical)
        if count % n:
            raise ShardingError(
                f"{what}={count} is not divisible by the mesh's tensor axis ({describe(axes)}, from the rule for "
                f"{logical!r}); choose a tensor axis size that divides the number of heads"
            )

    params = abstract_param_state(config) if abstract_params is None else abstract_params
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        if axes is None:
            continue
        spec = logical_to_spec(axes, rules, mesh.axis_names, shape)
        for dim, entry in enumerate(spec):
            mesh_axes = _targets(entry)
            n = _mesh_size(shape, mesh_axes)
            if var.shape[dim] % n:
                raise ShardingError(
                    f"parameter {_path_str(path)} {tuple(var.shape)}: dimension {dim} (logical {axes[dim]!r}, "
                    f"size {var.shape[dim]}) is not divisible by mesh axes {describe(mesh_axes)}; pick mesh sizes "
                    f"that divide it or map {axes[dim]!r} elsewhere in options.logical_axis_rules"
                )


# ----------------------------------------------------------------------------------------------- parameters
def param_specs(state, rules: Mapping[str, Any], mesh: Mesh):
    """PartitionSpecs for every variable of an (abstract) NNX state, from its ``logical_axes`` metadata.

    Works on any pytree whose leaves are NNX variables (parameters, optimizer states built from them by optax,
    which keep the metadata); leaves without logical axes (counters, RNG state, plain arrays) are replicated.
    """
    from flax import nnx

    rules = _as_rules(rules)

    def spec(v):
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        if axes is None:
            return PartitionSpec()
        return logical_to_spec(axes, rules, mesh.axis_names, dict(mesh.shape))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, rules: Mapping[str, Any], mesh: Mesh):
    """`NamedSharding` for every variable of an (abstract) NNX state (see `param_specs`)."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(state, rules, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def lower_sharded_init(config, mesh: Mesh, *, seed: int = 0, rules: Mapping[str, Any] | None = None):
    """``(graphdef, lowered)``: the model's initialiser traced under ``mesh`` and lowered with ``out_shardings`` from
    the logical-axis rules, ready to compile (what `create_sharded_model` runs; its compiled memory analysis shows
    what one device allocates)."""
    from flax import nnx

    from deepseekmoe_jax.model import DeepseekForCausalLM

    rules = rules_for(config) if rules is None else _as_rules(rules)
    abstract = nnx.eval_shape(lambda: DeepseekForCausalLM(config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    check_mesh_fits(config, mesh, rules, abstract_params=nnx.state(abstract, nnx.Param))
    shardings = param_shardings(abstract_state, rules, mesh)

    def init():
        return nnx.state(DeepseekForCausalLM(config, rngs=nnx.Rngs(seed)))

    with use_mesh(mesh, rules):
        lowered = jax.jit(init, out_shardings=shardings).lower()
    return graphdef, lowered


def create_sharded_model(
    config,
    mesh: Mesh,
    *,
    seed: int = 0,
    rules: Mapping[str, Any] | None = None,
    compiler_options: Mapping[str, Any] | None = None,
):
    """Build a `DeepseekForCausalLM` whose parameters are born sharded over ``mesh`` (no full copy anywhere).

    The initialiser runs compiled with ``out_shardings`` from the logical-axis rules (default: the config's
    `rules_for`), so each device only ever materialises its own shard. The values depend only on ``seed``, not on
    the mesh. ``compiler_options`` are XLA options for the initialiser's compilation.
    """
    from flax import nnx

    graphdef, lowered = lower_sharded_init(config, mesh, seed=seed, rules=rules)
    compiled = lowered.compile(dict(compiler_options) if compiler_options else None)
    return nnx.merge(graphdef, compiled())


# ----------------------------------------------------------------------------------------------- batches and jit
def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh`` (scalars, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(
    mesh: Mesh, rules: Mapping[str, Any] | None = None, *, leading: int = 0, shard_length: bool = True
) -> PartitionSpec:
    """PartitionSpec of a batch ``[..., B, T, ...]``: B over the mesh axes of ``act_batch`` (default data, fsdp and
    expert), T over those of ``act_length`` (default none; never with ``shard_length=False``, e.g. for ``T + 1``
    token windows), after ``leading`` unsharded dimensions (e.g. micro-batches)."""
    logical = (None,) * leading + ("act_batch", "act_length" if shard_length else None)
    return logical_to_spec(logical, _as_rules(rules), mesh.axis_names, dict(mesh.shape))


def batch_sharding(
    mesh: Mesh, rules: Mapping[str, Any] | None = None, *, leading: int = 0, shard_length: bool = True
) -> NamedSharding:
    """`NamedSharding` for every array of an input batch (see `batch_spec`)."""
    return NamedSharding(mesh, batch_spec(mesh, rules, leading=leading, shard_length=shard_length))


def batch_shards(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> int:
    """Into how many pieces the batch dimension is cut; the global batch size must be a multiple of it."""
    spec = batch_spec(mesh, rules)
    return _mesh_size(dict(mesh.shape), _targets(spec[0])) if len(spec) else 1


def shard_batch(batch, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """Place a global batch (pytree of host arrays ``[B, ...]``, the same on every process) on ``mesh`` with
    `batch_sharding`. Each device receives only its rows. For a batch of which each process holds only its own
    share, use `deepseekmoe_jax.distributed.global_batch_from_local`.
    """
    sharding = batch_sharding(mesh, rules)
    n = batch_shards(mesh, rules)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise ShardingError(
                f"batch array of shape {x.shape}: the batch dimension must be a multiple of {n}, the number of "
                f"batch shards of mesh {dict(mesh.shape)} (mesh axes of 'act_batch')"
            )
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree.map(put, batch)


class ShardedFunction:
    """A jitted function with explicit shardings whose traces run inside `use_mesh(mesh, rules)`.

    Call it like the function; ``.lower(*args)`` gives the lowered computation (``.compile().as_text()`` is the
    optimized HLO), ``.jitted`` the underlying `jax.jit` object.
    """

    def __init__(self, jitted, mesh: Mesh, rules: Mapping[str, Any]):
        self.jitted = jitted
        self.mesh = mesh
        self.rules = rules

    def __call__(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args)


def jit_step(
    fn: Callable,
    mesh: Mesh,
    state_shardings,
    *,
    rules: Mapping[str, Any] | None = None,
    extra_in_shardings: Sequence[Any] = (),
    out_shardings: Any = None,
    donate_state: bool = False,
    compiler_options: Mapping[str, Any] | None = None,
) -> ShardedFunction:
    """`jax.jit` for ``fn(state, batch, *extra) -> (new_state, aux)`` with shardings from the rules.

    Args:
      fn: a pure function. ``state`` is any pytree (an ``nnx.State`` of parameters, or a tuple of parameters and
        an optax state); ``batch`` a pytree of arrays with a leading batch dimension.
      mesh: the device mesh.
      state_shardings: shardings of ``state``, usually ``param_shardings(abstract_state, rules, mesh)``.
      rules: the rules table (pass ``rules_for(config)``); also used for the activation constraints in the trace.
      extra_in_shardings: shardings of any further positional arguments (e.g. ``replicated(mesh)`` for a key).
      out_shardings: default ``(state_shardings, replicated)``: the new state keeps its layout and the auxiliary
        outputs (loss, metrics) are replicated. Give any sharding pytree for other output structures, e.g.
        ``replicated(mesh)`` for an evaluation function that only returns metrics.
      donate_state: donate the input state's buffers (in-place update of parameters and optimizer state).
      compiler_options: XLA options for this compilation (`jax.jit`'s ``compiler_options``).
    """
    rules = _as_rules(rules)
    in_shardings = (state_shardings, batch_sharding(mesh, rules), *extra_in_shardings)
    if out_shardings is None:
        out_shardings = (state_shardings, replicated(mesh))
    jitted = jax.jit(
        fn,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=(0,) if donate_state else (),
        compiler_options=dict(compiler_options) if compiler_options else None,
    )
    return ShardedFunction(jitted, mesh, rules)
