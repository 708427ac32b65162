"""Meshes and placement: device meshes, parameter shardings, born-sharded models, batches and sharded jit steps.

The logical axis names and the rules table that maps them onto the mesh axes ``data``, ``fsdp``, ``expert`` and
``tensor`` are in `deepseekmoe_jax.partitioning` (which the model's modules import); this module applies them to
the model and to devices.

Typical use (one process or many; see ``docs/sharding.md``)::

    mesh = sharding.mesh_from_config({"data": 1, "fsdp": -1, "expert": 4, "tensor": 1}, config=config)
    model = sharding.create_sharded_model(config, mesh)            # parameters born sharded
    graphdef, params = nnx.split(model)
    rules = partitioning.rules_for(config)
    step = sharding.jit_step(train_step, mesh, sharding.param_shardings(params, rules, mesh), rules=rules)
    params, metrics = step(params, sharding.shard_batch(batch, mesh, rules))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseekmoe_jax.model import DeepseekForCausalLM, abstract_model
from deepseekmoe_jax.partitioning import (
    DEFAULT_MESH,
    MESH_AXES,
    ShardingError,
    logical_to_spec,
    mesh_size,
    rule_targets,
    rules_dict,
    rules_for,
    use_mesh,
)


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


def check_mesh_fits(config, mesh: Mesh, rules: Mapping[str, Any] | None = None, abstract_params=None) -> None:
    """Raise `ShardingError` if ``config`` cannot be laid out on ``mesh`` under ``rules`` (default: the config's).

    Checks, with messages naming the numbers: routed experts divisible by the mesh axes of ``expert`` (and of the
    dispatched activations), query and key/value heads divisible by the mesh axes of the head dimensions, and then
    every parameter dimension divisible by the mesh axes its logical name maps to (naming the parameter).
    ``abstract_params`` (an abstract ``nnx.State`` of the parameters) saves re-tracing the model.
    """
    rules = rules_for(config) if rules is None else rules_dict(rules)
    shape = dict(mesh.shape)

    def size_of(logical: str) -> tuple[int, tuple[str, ...]]:
        axes = tuple(a for a in rule_targets(rules.get(logical)) if a in shape and shape[a] > 1)
        return mesh_size(shape, axes), axes

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

    params = nnx.state(abstract_model(config), nnx.Param) if abstract_params is None else abstract_params
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        if axes is None:
            continue
        spec = logical_to_spec(axes, rules, mesh.axis_names, shape)
        for dim, entry in enumerate(spec):
            mesh_axes = rule_targets(entry)
            n = mesh_size(shape, mesh_axes)
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
    rules = rules_dict(rules)

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
    rules = rules_for(config) if rules is None else rules_dict(rules)
    abstract = abstract_model(config, seed=seed)
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
    return logical_to_spec(logical, rules_dict(rules), mesh.axis_names, dict(mesh.shape))


def batch_sharding(
    mesh: Mesh, rules: Mapping[str, Any] | None = None, *, leading: int = 0, shard_length: bool = True
) -> NamedSharding:
    """`NamedSharding` for every array of an input batch (see `batch_spec`)."""
    return NamedSharding(mesh, batch_spec(mesh, rules, leading=leading, shard_length=shard_length))


def batch_shards(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> int:
    """Into how many pieces the batch dimension is cut; the global batch size must be a multiple of it."""
    spec = batch_spec(mesh, rules)
    return mesh_size(dict(mesh.shape), rule_targets(spec[0])) if len(spec) else 1


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
    batch_shardings: Any = None,
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
      batch_shardings: shardings of ``batch``; default `batch_sharding` (the leading dimension over the batch
        axes). The trainer passes its micro-batch layout ``[micro-batches, B, T+1]``.
      extra_in_shardings: shardings of any further positional arguments (e.g. ``replicated(mesh)`` for a key).
      out_shardings: default ``(state_shardings, replicated)``: the new state keeps its layout and the auxiliary
        outputs (loss, metrics) are replicated. Give any sharding pytree for other output structures, e.g.
        ``replicated(mesh)`` for an evaluation function that only returns metrics.
      donate_state: donate the input state's buffers (in-place update of parameters and optimizer state).
      compiler_options: XLA options for this compilation (`jax.jit`'s ``compiler_options``).
    """
    rules = rules_dict(rules)
    if batch_shardings is None:
        batch_shardings = batch_sharding(mesh, rules)
    in_shardings = (state_shardings, batch_shardings, *extra_in_shardings)
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
