"""Meshes, rules, golden parameter layouts, activation layouts, batches, and save-on-one-mesh/restore-on-another.

Runs on the 8 fake CPU devices of conftest. Numerical equality of sharded and single-device training steps is in
test_sharding_parity.py; the two-process run is in test_multiprocess.py.
"""

import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mp_worker import fast_compile

from deepseekmoe_jax import DeepseekConfig, checkpoint, distributed, partitioning, sharding
from deepseekmoe_jax.config_files import apply_overrides, read_config_file
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.partitioning import ShardingError

# Faster CPU compilation of the tiny test models; see mp_worker.fast_compile.
FAST_COMPILE = fast_compile()


def flat_specs(config, mesh, rules=None):
    params = nnx.state(abstract_model(config), nnx.Param)
    specs = sharding.param_specs(params, partitioning.rules_for(config) if rules is None else rules, mesh)
    return {"/".join(map(str, path)): spec for path, spec in nnx.to_flat_state(specs)}


# ----------------------------------------------------------------------------------------------- meshes
def test_make_mesh_shapes_and_fill():
    mesh = sharding.make_mesh(data=2, expert=4)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert dict(sharding.make_mesh(fsdp=2, expert=-1).shape)["expert"] == 4
    assert dict(sharding.make_mesh(devices=jax.devices()[:1]).shape) == dict.fromkeys(partitioning.MESH_AXES, 1)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(data=3), "needs 3 devices but 8 are available"),
        (dict(data=2, expert=2), "needs 4 devices but 8"),
        (dict(data=3, expert=-1), "8 devices are not divisible by the product 3"),
        (dict(data=-1, expert=-1), "only one mesh axis may be -1"),
        (dict(tensor=0), "mesh axis tensor=0"),
        (dict(fsdp=2.0), "mesh axis fsdp=2.0"),
    ],
)
def test_make_mesh_rejects_bad_shapes(sizes, message):
    with pytest.raises(ShardingError, match=message):
        sharding.make_mesh(**sizes)


def test_mesh_errors_for_models_that_do_not_fit():
    with pytest.raises(
        ShardingError, match=r"n_routed_experts=6 is not divisible by the mesh's expert axis \(expert=4"
    ):
        sharding.make_mesh(data=2, expert=4, config=small_config(n_routed_experts=6))
    with pytest.raises(ShardingError, match=r"num_attention_heads=4 is not divisible by the mesh's tensor axis"):
        sharding.make_mesh(tensor=8, config=small_config())
    two_kv = small_config(num_key_value_heads=2)
    with pytest.raises(ShardingError, match=r"num_key_value_heads=2 is not divisible .*tensor=4"):
        sharding.make_mesh(fsdp=2, tensor=4, config=two_kv)
    # Anything else that does not divide is named by parameter: here the vocabulary over 'tensor'.
    with pytest.raises(ShardingError, match=r"parameter .*(lm_head|embed_tokens).*'vocab', size 90.*tensor=4"):
        sharding.make_mesh(data=2, tensor=4, config=small_config(vocab_size=90))
    # and the hidden size over 'fsdp'
    with pytest.raises(ShardingError, match=r"'embed', size 36\) is not divisible by mesh axes fsdp=8"):
        sharding.check_mesh_fits(small_config(hidden_size=36, num_attention_heads=2), sharding.make_mesh(fsdp=8))
    # fits: no error
    sharding.make_mesh(fsdp=2, expert=2, tensor=2, config=small_config())


def test_mesh_from_config_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            model:
              vocab_size: 96
              hidden_size: 32
              intermediate_size: 48
              moe_intermediate_size: 16
              num_hidden_layers: 2
              num_attention_heads: 4
              n_routed_experts: 8
              num_experts_per_tok: 2
            mesh:
              data: 1
              fsdp: -1
              expert: 4
            """
        )
    )
    raw = read_config_file(path)
    config = DeepseekConfig.from_file(path)  # the model config ignores the mesh section
    mesh = sharding.mesh_from_config(raw["mesh"], config=config)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    # dotted overrides work on the mesh section like on any other
    raw = apply_overrides(raw, {"mesh.expert": 8, "mesh.fsdp": 1})
    assert dict(sharding.mesh_from_config(raw["mesh"], config=config).shape)["expert"] == 8
    # no section: every device on fsdp
    assert dict(sharding.mesh_from_config(None).shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    with pytest.raises(ShardingError, match=r"unknown axis name\(s\) \['experts'\]"):
        sharding.mesh_from_config({"experts": 8})
    with pytest.raises(ShardingError, match="n_routed_experts=4 is not divisible .*expert=8"):
        sharding.mesh_from_config({"expert": 8}, config=config.replace(n_routed_experts=4, num_experts_per_tok=2))


# ----------------------------------------------------------------------------------------------- rules
def test_rules_are_validated_data():
    rules = partitioning.rules_dict()
    assert set(rules) == set(partitioning.LOGICAL_AXES)
    assert rules["act_batch"] == ("data", "fsdp", "expert") and rules["expert"] == "expert"
    assert partitioning.rules_dict(overrides={"embed": None, "mlp": ["tensor"]})["embed"] is None
    with pytest.raises(ShardingError, match="override 'embedd': no such logical axis"):
        partitioning.rules_dict(overrides={"embedd": None})
    with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
        partitioning.rules_dict(overrides={"mlp": "model"})
    with pytest.raises(ShardingError, match="names a mesh axis twice"):
        partitioning.rules_dict(overrides={"act_batch": ["data", "data"]})


def test_logical_to_spec_collisions_and_divisibility():
    rules = partitioning.rules_dict(overrides={"expert_mlp": "expert"})
    shape = {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    with pytest.raises(ShardingError, match="mesh axis 'expert' is used by both logical axes 'expert' and"):
        partitioning.logical_to_spec(("expert", "embed", "expert_mlp"), rules, partitioning.MESH_AXES, shape)
    default = partitioning.rules_dict()
    assert partitioning.logical_to_spec(("act_batch", "act_length"), default, partitioning.MESH_AXES, shape) == P(
        ("data", "expert")
    )
    # Activations: a dimension keeps the longest prefix of its mesh axes that divides it (a batch of 2 keeps data).
    assert partitioning.logical_to_spec(("act_batch", None), default, partitioning.MESH_AXES, shape, (2, 5)) == P(
        "data"
    )
    assert partitioning.logical_to_spec(("act_batch", None), default, partitioning.MESH_AXES, shape, (1, 5)) == P()
    with pytest.raises(ShardingError, match="rank 3"):
        partitioning.logical_to_spec(("act_batch", None), default, partitioning.MESH_AXES, shape, (2, 5, 1))


def test_rule_overrides_from_config_end_to_end(tmp_path):
    # Replicate the expert weights' H and I dimensions and keep batches off the expert axis.
    yaml_text = textwrap.dedent(
        """\
        model: {vocab_size: 96, hidden_size: 32, intermediate_size: 48, moe_intermediate_size: 16,
                num_hidden_layers: 2, num_attention_heads: 4, n_routed_experts: 8, num_experts_per_tok: 2,
                n_shared_experts: 1}
        options:
          logical_axis_rules:
            embed: null
            expert_mlp: null
            act_batch: [data, fsdp]
        """
    )
    path = tmp_path / "rules.yaml"
    path.write_text(yaml_text)
    config = DeepseekConfig.from_file(path)
    rules = partitioning.rules_for(config)
    assert rules["embed"] is None and rules["expert_mlp"] is None and rules["act_batch"] == ("data", "fsdp")
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    model = sharding.create_sharded_model(config, mesh, compiler_options=FAST_COMPILE)
    experts = model.model.segments[0].layers[0].mlp.experts
    assert experts.w_gate[...].sharding.spec == P(None, "expert")
    assert model.model.embed_tokens[...].sharding.spec == P("tensor")
    assert sharding.batch_spec(mesh, rules) == P("fsdp")
    # The overrides travel with a checkpoint's options and are applied again on restore.
    checkpoint.write_config_files(tmp_path, config)
    assert partitioning.rules_for(checkpoint.read_config(tmp_path)) == rules
    bad = config.with_options(logical_axis_rules={"experts": None})
    with pytest.raises(ShardingError, match="no such logical axis"):
        sharding.create_sharded_model(bad, mesh)


# ----------------------------------------------------------------------------------------------- golden layouts
# Every parameter of small_config() (layer 0 dense, layers 1-3 MoE) on a mesh where all four axes are in use
# except data. Per-layer parameters carry the stacked ('layers', replicated) dimension first. Expert kernels
# [layers, E, H, I]: E over expert, H over fsdp, I over tensor (w_down is [layers, E, I, H]).
GOLDEN_FSDP2_EXPERT2_TENSOR2 = {
    "lm_head": P("fsdp", "tensor"),
    "model/embed_tokens": P("tensor", "fsdp"),
    "model/norm/weight": P(),
    "model/segments/0/layers/0/input_layernorm/weight": P(),
    "model/segments/0/layers/0/post_attention_layernorm/weight": P(),
    "model/segments/0/layers/0/self_attn/q_proj": P(None, "fsdp", "tensor"),
    "model/segments/0/layers/0/self_attn/k_proj": P(None, "fsdp", "tensor"),
    "model/segments/0/layers/0/self_attn/v_proj": P(None, "fsdp", "tensor"),
    "model/segments/0/layers/0/self_attn/o_proj": P(None, "tensor", None, "fsdp"),
    "model/segments/0/layers/0/mlp/gate_proj": P(None, "fsdp", "tensor"),
    "model/segments/0/layers/0/mlp/up_proj": P(None, "fsdp", "tensor"),
    "model/segments/0/layers/0/mlp/down_proj": P(None, "tensor", "fsdp"),
    "model/segments/1/layers/0/input_layernorm/weight": P(),
    "model/segments/1/layers/0/post_attention_layernorm/weight": P(),
    "model/segments/1/layers/0/self_attn/q_proj": P(None, "fsdp", "tensor"),
    "model/segments/1/layers/0/self_attn/k_proj": P(None, "fsdp", "tensor"),
    "model/segments/1/layers/0/self_attn/v_proj": P(None, "fsdp", "tensor"),
    "model/segments/1/layers/0/self_attn/o_proj": P(None, "tensor", None, "fsdp"),
    "model/segments/1/layers/0/mlp/gate/kernel": P(None, "fsdp"),
    "model/segments/1/layers/0/mlp/experts/w_gate": P(None, "expert", "fsdp", "tensor"),
    "model/segments/1/layers/0/mlp/experts/w_up": P(None, "expert", "fsdp", "tensor"),
    "model/segments/1/layers/0/mlp/experts/w_down": P(None, "expert", "tensor", "fsdp"),
    "model/segments/1/layers/0/mlp/shared_experts/gate_proj": P(None, "fsdp", "tensor"),
    "model/segments/1/layers/0/mlp/shared_experts/up_proj": P(None, "fsdp", "tensor"),
    "model/segments/1/layers/0/mlp/shared_experts/down_proj": P(None, "tensor", "fsdp"),
}

# The same model on data 2 x expert 4: axes of size 1 vanish, so only the expert dimension is sharded.
GOLDEN_DATA2_EXPERT4_EXPERTS = {
    "model/segments/1/layers/0/mlp/experts/w_gate": P(None, "expert"),
    "model/segments/1/layers/0/mlp/experts/w_up": P(None, "expert"),
    "model/segments/1/layers/0/mlp/experts/w_down": P(None, "expert"),
    "model/segments/1/layers/0/mlp/gate/kernel": P(),
    "model/segments/1/layers/0/self_attn/q_proj": P(),
}


def test_golden_param_specs():
    config = small_config()
    specs = flat_specs(config, sharding.make_mesh(fsdp=2, expert=2, tensor=2))
    assert specs == GOLDEN_FSDP2_EXPERT2_TENSOR2
    specs = flat_specs(config, sharding.make_mesh(data=2, expert=4))
    assert {k: specs[k] for k in GOLDEN_DATA2_EXPERT4_EXPERTS} == GOLDEN_DATA2_EXPERT4_EXPERTS
    assert set(specs) == set(GOLDEN_FSDP2_EXPERT2_TENSOR2)


def test_every_parameter_has_logical_axes_with_layers_first():
    config = small_config()
    params = nnx.state(abstract_model(config), nnx.Param)
    rules = partitioning.rules_dict()
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata().get("logical_axes")
        name = "/".join(map(str, path))
        assert axes is not None and len(axes) == len(var.shape), name
        assert all(a in rules for a in axes), name
        assert (axes[0] == "layers") == ("segments" in path), name


# ----------------------------------------------------------------------------------------------- activations
def _constraints(jaxpr, out):
    """(shape, PartitionSpec) of every sharding constraint in a jaxpr, including scan bodies."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            out.append((tuple(eqn.invars[0].aval.shape), eqn.params["sharding"].spec))
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _constraints(inner, out)
    return out


@pytest.mark.parametrize(
    "mesh_sizes, batch_spec, expert_spec, back_spec",
    [
        # expert 8: batches and groups over expert; dispatched [E, G, C, H] has E over expert.
        (dict(expert=8), P("expert"), P("expert"), P(None, "expert")),
        # data 2 x expert 4: after dispatch the groups keep 'data' and E takes 'expert'.
        (dict(data=2, expert=4), P(("data", "expert")), P("expert", "data"), P(None, ("data", "expert"))),
        (dict(fsdp=2, expert=2, tensor=2), P(("fsdp", "expert")), P("expert", "fsdp"), P(None, ("fsdp", "expert"))),
    ],
)
def test_activation_layouts(mesh_sizes, batch_spec, expert_spec, back_spec):
    config = small_config(options={"moe_group_size": 8})
    b, t, h, e = 8, 16, config.hidden_size, config.n_routed_experts
    g, s = b * t // 8, 8
    graphdef, state = nnx.split(abstract_model(config))
    mesh = sharding.make_mesh(**mesh_sizes)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids, training=True).logits

    with partitioning.use_mesh(mesh, partitioning.rules_for(config)):
        jaxpr = jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((b, t), jnp.int32))
    found = _constraints(jaxpr.jaxpr, [])
    by_shape = {}
    for shape, spec in found:
        by_shape.setdefault(shape, []).append(spec)
    # The residual stream [B, T, H] and the logits [B, T, V] (V over tensor): batch-sharded.
    assert set(by_shape[(b, t, h)]) == {batch_spec}
    tensor = dict(mesh.shape)["tensor"] > 1
    vocab_spec = P(*batch_spec, None, "tensor") if tensor else batch_spec
    assert set(by_shape[(b, t, config.vocab_size)]) == {vocab_spec}
    # Tokens in dispatch groups [G, S, H]: groups sharded like the batch.
    assert set(by_shape[(g, s, h)]) == {batch_spec}
    c = next(shape[2] for shape in by_shape if len(shape) == 4 and shape[0] == e and shape[1] == g)
    # Dispatched tokens [E, G, C, H]: computed in the groups' layout, moved to experts over 'expert' (all-to-all),
    # and the expert outputs moved back to the groups' layout (all-to-all) for the combine.
    assert by_shape[(e, g, c, h)] == [back_spec, expert_spec, expert_spec, back_spec]
    # Inside the experts [E, G, C, I]: I over tensor when there is one.
    inner = P(*expert_spec, *[None] * (3 - len(expert_spec)), "tensor") if tensor else expert_spec
    assert by_shape[(e, g, c, config.moe_intermediate_size)] == [inner]
    # Attention heads [B, T, N, D] over tensor.
    heads = by_shape[(b, t, config.num_attention_heads, config.head_dim)]
    assert set(heads) == {P(*batch_spec, None, "tensor") if tensor else batch_spec}


def test_constrain_without_use_mesh_reads_jax_mesh_or_refuses():
    """Outside `use_mesh`, `constrain` takes the mesh of ``jax.set_mesh`` (default rules); a function traced for
    several devices with no mesh at all raises instead of silently dropping the constraint; one device: a no-op."""
    mesh = sharding.make_mesh(fsdp=8)
    on_8 = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P()))  # replicated over the 8 devices
    on_1 = jnp.ones((8, 4))

    def fn():  # a new function each time, so that no trace is reused across contexts
        return lambda x: partitioning.constrain(x * 2, ("act_batch", None))

    with jax.set_mesh(mesh):
        assert _constraints(jax.make_jaxpr(fn())(on_8).jaxpr, []) == [((8, 4), P("fsdp"))]
        out = jax.jit(fn())(on_8)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 2)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.ones((8, 4)))

    with pytest.raises(ShardingError, match=r"constrain\(\('act_batch', None\)\) while tracing for 8 devices"):
        jax.jit(fn())(on_8)
    with pytest.raises(ShardingError, match="with no mesh set"):
        jax.jit(fn()).lower(jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P())))

    assert _constraints(jax.make_jaxpr(fn())(on_1).jaxpr, []) == []
    assert jax.jit(fn())(on_1).sharding.device_set == on_1.sharding.device_set
    with partitioning.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
        assert _constraints(jax.make_jaxpr(fn())(on_1).jaxpr, []) == []


# ----------------------------------------------------------------------------------------------- batches
def test_shard_batch_and_process_local_assembly():
    mesh = sharding.make_mesh(data=2, expert=4)
    ids = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    placed = sharding.shard_batch(batch, mesh)
    assert placed["input_ids"].sharding == sharding.batch_sharding(mesh)
    assert sharding.batch_sharding(mesh).spec == P(("data", "expert"))
    assert sharding.batch_shards(mesh) == 8
    shard_rows = sorted(int(np.asarray(s.data)[0, 0]) // 5 for s in placed["input_ids"].addressable_shards)
    assert shard_rows == list(range(8))  # one row per device
    np.testing.assert_array_equal(np.asarray(placed["input_ids"]), ids)
    # One process: this process's slice is the whole batch and assembling it gives the same placed arrays.
    rows = distributed.process_batch_slice(8, sharding.batch_sharding(mesh))
    assert rows == slice(0, 8)
    local = distributed.global_batch_from_local({k: v[rows] for k, v in batch.items()}, mesh, 8)
    assert local["input_ids"].sharding == placed["input_ids"].sharding
    np.testing.assert_array_equal(np.asarray(local["input_ids"]), ids)
    with pytest.raises(ShardingError, match="must be a multiple of 8"):
        sharding.shard_batch({"input_ids": ids[:6]}, mesh)
    with pytest.raises(distributed.DistributedError, match="should have 8 rows"):
        distributed.global_batch_from_local({"input_ids": ids[:4]}, mesh, 8)


# ----------------------------------------------------------------------------------------------- distributed
@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"JAX_NUM_PROCESSES": "1"}, None),
        (
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
            distributed.Launch("JAX environment", "10.0.0.1:1234", 4, 3),
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "n[1-2]"},
            distributed.Launch("SLURM"),
        ),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, distributed.Launch("Open MPI")),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "1"}, distributed.Launch("TPU pod")),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"DEEPSEEKMOE_DISTRIBUTED": "1"}, distributed.Launch("forced")),
    ],
)
def test_detect_launch(environ, expected):
    assert distributed.detect_launch(environ) == expected


def test_initialize_is_a_no_op_for_one_process_and_checks_its_inputs():
    assert distributed.initialize(environ={}) is None
    assert not jax.distributed.is_initialized()
    with pytest.raises(distributed.DistributedError, match=r"missing num_processes \(JAX_NUM_PROCESSES\)"):
        distributed.initialize(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_PROCESS_ID": "0"})
    with pytest.raises(distributed.DistributedError, match="process_id=2 is outside 0..1"):
        distributed.initialize("127.0.0.1:1", 2, 2, environ={})
    with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID='x': expected an integer"):
        distributed.detect_launch({"JAX_PROCESS_ID": "x"})
    assert distributed.process_count() == 1 and distributed.process_index() == 0 and distributed.is_main_process()
    assert distributed.process_batch_slice(6) == slice(0, 6)


def test_a_failed_connection_names_the_launch(monkeypatch):
    def unreachable(**kwargs):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")

    monkeypatch.setattr(jax.distributed, "initialize", unreachable)
    monkeypatch.setattr(distributed, "_set_cpu_collectives", lambda: None)  # leave this process's config alone
    env = {"JAX_COORDINATOR_ADDRESS": "10.1.2.3:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    with pytest.raises(distributed.DistributedError) as info:
        distributed.initialize(environ=env, timeout_s=7)
    message = str(info.value)
    for part in ("JAX environment launch", "coordinator 10.1.2.3:1234", "process 1 of 2", "timeout 7 s"):
        assert part in message
    assert "DEADLINE_EXCEEDED" in message
    assert not jax.distributed.is_initialized()


def test_barrier_waits_only_with_several_processes(monkeypatch):
    from jax.experimental import multihost_utils

    calls = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", calls.append)
    distributed.barrier("one process")
    assert calls == []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    distributed.barrier("two processes")
    assert calls == ["two processes"]


# ----------------------------------------------------------------------------------------------- save / restore
def test_save_on_one_mesh_restore_on_another(tmp_path):
    config = small_config(num_hidden_layers=2, first_k_dense_replace=0, options={"moe_group_size": 8})
    rules = partitioning.rules_for(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 16)).astype(np.int32)

    def logits_on(model, mesh):
        graphdef, state = nnx.split(model)
        shardings = sharding.param_shardings(state, rules, mesh)

        def forward(state, batch):
            return nnx.merge(graphdef, state)(batch).logits

        step = sharding.jit_step(
            forward,
            mesh,
            shardings,
            rules=rules,
            out_shardings=sharding.replicated(mesh),
            compiler_options=FAST_COMPILE,
        )
        return np.asarray(step(state, sharding.shard_batch(ids, mesh, rules)))

    saved_on = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    model = sharding.create_sharded_model(config, saved_on, seed=3, compiler_options=FAST_COMPILE)
    before = logits_on(model, saved_on)
    checkpoint.save_checkpoint(model, tmp_path / "model")

    restored_on = sharding.make_mesh(data=2, expert=4)
    restored = checkpoint.load_checkpoint(tmp_path / "model", mesh=restored_on)
    params = nnx.state(restored, nnx.Param)
    expected = sharding.param_shardings(params, rules, restored_on)
    for (path, var), (_, want) in zip(nnx.to_flat_state(params), nnx.to_flat_state(expected), strict=True):
        assert var[...].sharding.is_equivalent_to(want, var.ndim), path
        assert var[...].sharding.mesh.shape == restored_on.shape, path
    w_gate = restored.model.segments[0].layers[0].mlp.experts.w_gate[...]
    assert w_gate.sharding.spec == P(None, "expert")
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    after = logits_on(restored, restored_on)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    assert math.isfinite(float(np.abs(after).max()))


def test_sharded_init_memory_is_the_devices_share():
    # Large routed experts (each of the three expert tensors is 4 MiB, 512 KiB per device on expert 8) and a small
    # replicated rest (no shared experts: they would be as wide as the routed ones and replicated).
    config = small_config(
        num_hidden_layers=2, first_k_dense_replace=0, moe_intermediate_size=2048, n_shared_experts=None
    )
    mesh = sharding.make_mesh(expert=8)
    state = nnx.state(abstract_model(config))
    expert_bytes = 3 * math.prod(state["model"]["segments"][0]["layers"][0]["mlp"]["experts"]["w_gate"].shape) * 4
    other_bytes = 4 * sum(math.prod(v.shape) for v in jax.tree.leaves(state)) - expert_bytes

    # Exactly what create_sharded_model compiles and runs.
    _, lowered = sharding.lower_sharded_init(config, mesh)
    memory = lowered.compile(FAST_COMPILE).memory_analysis()
    share = memory.output_size_in_bytes  # this device's parameters: 1/8 of the experts, the rest replicated
    assert share <= expert_bytes / 8 + other_bytes + 4096, (share, expert_bytes, other_bytes)  # + alignment
    assert share < expert_bytes / 4
    # Random numbers are generated per shard: scratch memory is of the order of the device's share (measured 1.66x),
    # not of whole tensors (drawing each tensor whole and slicing it takes about 15x here).
    assert memory.temp_size_in_bytes < 2 * share, (memory.temp_size_in_bytes, share)
