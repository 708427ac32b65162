"""Learning-rate schedules at their boundaries, the weight-decay mask, the optimizer recipe and the settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config
from flax import nnx

from deepseekmoe_jax import ConfigError
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.train.optim import decay_mask, make_optimizer, make_schedule
from deepseekmoe_jax.train.settings import TrainSettings, load_run_config, run_config_from_dict


def lr(settings, t):
    return float(make_schedule(settings)(t))


def test_step_schedule_boundaries():
    s = TrainSettings(steps=1000, warmup_steps=100, learning_rate=4.2e-4, schedule="step")
    peak = 4.2e-4
    assert lr(s, 0) == pytest.approx(peak / 100)  # the first update already moves
    assert lr(s, 49) == pytest.approx(peak * 50 / 100)
    assert lr(s, 99) == pytest.approx(peak)  # last warmup update reaches the peak
    assert lr(s, 100) == pytest.approx(peak)
    assert lr(s, 799) == pytest.approx(peak)  # 80% of 1000 steps = update 800
    assert lr(s, 800) == pytest.approx(peak * 0.316)
    assert lr(s, 899) == pytest.approx(peak * 0.316)
    assert lr(s, 900) == pytest.approx(peak * 0.316**2)
    assert lr(s, 999) == pytest.approx(peak * 0.316**2)
    # jit-compatible (traced step counts, as inside optax)
    np.testing.assert_allclose(jax.jit(make_schedule(s))(jnp.int32(850)), peak * 0.316, rtol=1e-6)


def test_cosine_and_constant_schedules():
    c = TrainSettings(steps=110, warmup_steps=10, learning_rate=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr(c, 9) == pytest.approx(1.0)
    assert lr(c, 10) == pytest.approx(1.0)
    assert lr(c, 10 + 99 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 49 / 99)), rel=1e-5)
    assert lr(c, 109) == pytest.approx(0.1)  # the last update reaches the floor
    assert lr(c, 500) == pytest.approx(0.1)
    k = TrainSettings(steps=50, warmup_steps=0, learning_rate=1e-5, schedule="constant")
    assert lr(k, 0) == lr(k, 49) == pytest.approx(1e-5)


def test_decay_mask_exempts_norms_only():
    config = small_config()
    abstract = abstract_model(config)
    _, params = nnx.split(abstract, nnx.Param)
    mask = decay_mask(params)
    flat = {
        "/".join(str(getattr(p, "key", p)) for p in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    exempt = sorted(k for k, v in flat.items() if not v)
    assert exempt and all(k.endswith("layernorm/weight") or k == "model/norm/weight" for k in exempt)
    assert len(exempt) == 2 * 2 + 1  # two norms per segment (dense, MoE) + the final norm
    for decayed in ("lm_head", "model/embed_tokens", "model/segments/1/layers/0/mlp/gate/kernel"):
        assert flat[decayed] is True


def test_optimizer_is_clipped_adamw_with_masked_decay():
    s = TrainSettings(steps=10, warmup_steps=0, learning_rate=0.1, schedule="constant", weight_decay=0.1)
    params = {"w": jnp.ones((2, 2)), "norm": jnp.ones((2,))}
    mask = {"w": True, "norm": False}
    opt = make_optimizer(s, mask)
    state = opt.init(params)
    grads = {"w": jnp.full((2, 2), 100.0), "norm": jnp.zeros((2,))}  # global norm 200 -> clipped to 1
    updates, _ = opt.update(grads, state, params)
    # Reference: optax's own clip + adamw with the paper's betas.
    ref_opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask)
    )
    ref, _ = ref_opt.update(grads, ref_opt.init(params), params)
    for k in params:
        np.testing.assert_allclose(updates[k], ref[k], rtol=1e-6)
    np.testing.assert_allclose(updates["norm"], 0.0)  # zero gradient and no decay: no movement
    # first Adam step moves by lr (normalised gradient) plus lr * wd * w
    np.testing.assert_allclose(updates["w"], -0.1 * (1.0 + 0.1), rtol=1e-5)


def test_settings_validation(repo_root):
    with pytest.raises(ConfigError, match=r"train.grad_accum=3: must divide train.batch_size=8"):
        TrainSettings(batch_size=8, grad_accum=3)
    with pytest.raises(ConfigError, match=r"train.schedule='linear'"):
        TrainSettings(schedule="linear")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\] in 'train'"):
        run_config_from_dict({"model": {}, "train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        run_config_from_dict({"model": {}, "trian": {}})
    for name in ("tiny", "deepseekmoe-2b", "deepseekmoe-16b", "deepseekmoe-145b"):
        run = load_run_config(repo_root / "configs" / f"{name}.yaml")
        assert run.train.seq_len <= run.model.max_position_embeddings
    tiny = load_run_config(repo_root / "configs" / "tiny.yaml", {"train.steps": 7, "mesh.data": 1})
    assert tiny.train.steps == 7 and tiny.mesh.data == 1 and tiny.data.corpus == "python-stdlib"
    paper16 = load_run_config(repo_root / "configs" / "deepseekmoe-16b.yaml").train
    assert (paper16.b1, paper16.b2, paper16.weight_decay, paper16.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (paper16.schedule, paper16.decay_points, paper16.decay_factor) == ("step", (0.8, 0.9), 0.316)
    assert (paper16.learning_rate, paper16.warmup_steps, paper16.seq_len) == (4.2e-4, 2000, 4096)
    assert paper16.batch_size == 4608
    # The paper's 2B and 16B runs drop no tokens (null = no-drop mode), init std 0.006, fp32 master weights.
    for name in ("deepseekmoe-2b", "deepseekmoe-16b"):
        options = load_run_config(repo_root / "configs" / f"{name}.yaml").model.options
        assert options.capacity_factor_train is None, name
        assert options.init_std == 0.006 and options.param_dtype == "float32", name


def test_a_run_without_a_mesh_section_shards_over_every_device():
    from deepseekmoe_jax.train.placement import build_mesh

    run = run_config_from_dict({"model": {}})
    mesh = build_mesh(run.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "expert": 1, "tensor": 1}
    assert jax.device_count() == 8
    # Inside a section, a missing axis is 1 (as `sharding.mesh_from_config` reads it).
    partial = run_config_from_dict({"model": {}, "mesh": {"data": -1}})
    assert dict(build_mesh(partial.mesh).shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['expert_parallel'\] in 'mesh'"):
        run_config_from_dict({"model": {}, "mesh": {"expert_parallel": 2}})


def test_fresh_parameters_follow_the_papers_init_std(repo_root):
    """What the trainer initialises (sharded, seed train.seed): every weight matrix is N(0, init_std) with
    init_std = 0.006 from the 16B preset's options, drawn independently; RMSNorm weights start at one."""
    from deepseekmoe_jax.partitioning import rules_for
    from deepseekmoe_jax.train.placement import build_mesh
    from deepseekmoe_jax.train.state import initial_params

    std = load_run_config(repo_root / "configs" / "deepseekmoe-16b.yaml").model.options.init_std
    assert std == 0.006
    small = small_config(bos_token_id=1, eos_token_id=2).to_hf(metadata=False)  # ids inside its vocabulary
    run = run_config_from_dict({"model": small, "options": {"init_std": std}, "mesh": {"data": 8}})
    mesh = build_mesh(run.mesh)
    params = initial_params(run, mesh, rules_for(run.model), lambda _m: None)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}

    norms = {k: v for k, v in flat.items() if k.endswith("layernorm']['weight']") or k == "['model']['norm']['weight']"}
    assert len(norms) == 2 * 2 + 1  # two per segment (dense, MoE) + the final norm
    for k, v in norms.items():
        np.testing.assert_array_equal(v, 1.0, err_msg=k)
    matrices = {k: v for k, v in flat.items() if k not in norms}
    assert all(v.ndim >= 2 for v in matrices.values())  # no biases or other vectors in this config
    for k, v in matrices.items():
        n = v.size
        # Sample std of n normal draws: relative standard error 1/sqrt(2n); sample mean: std/sqrt(n). 5 sigma.
        assert abs(v.std() / std - 1) < 5 / np.sqrt(2 * n), (k, v.std())
        assert abs(v.mean()) < 5 * std / np.sqrt(n), (k, v.mean())
    pooled = np.concatenate([v.ravel() for v in matrices.values()])
    assert pooled.size > 50_000 and abs(pooled.std() / std - 1) < 0.01
    assert np.mean(np.abs(pooled) > 3 * std) == pytest.approx(0.0027, abs=0.0015)  # normal tails, not truncated
    # Independent draws: no two parameters (nor two experts of one stack) start from the same numbers.
    heads = [tuple(v.ravel()[:8]) for v in matrices.values()]
    assert len(set(heads)) == len(heads)
    experts = matrices["['model']['segments'][1]['layers'][0]['mlp']['experts']['w_gate']"]
    assert experts.shape[:2] == (3, 8)
    flat_experts = experts.reshape(24, -1)
    assert len({tuple(e[:8]) for e in flat_experts}) == 24
