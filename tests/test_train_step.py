"""The jitted training step: gradient accumulation, chunked cross-entropy, the balance loss at work, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config
from flax import nnx, traverse_util

from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.train.optim import decay_mask, make_optimizer, make_schedule
from deepseekmoe_jax.train.settings import TrainSettings
from deepseekmoe_jax.train.step import ModelBuilder, TrainState, chunked_nll, make_train_step

SETTINGS = TrainSettings(
    steps=30, warmup_steps=0, learning_rate=3e-3, schedule="constant", batch_size=8, seq_len=32, grad_clip=1.0
)
# One MoE layer, 8 experts top-2, one shared expert; a strong balance loss to see its effect within 30 steps.
CONFIG = small_config(num_hidden_layers=1, first_k_dense_replace=0, aux_loss_alpha=0.5)


def random_params(config, seed=0):
    """Parameters drawn with numpy (N(0, init_std) matrices, unit norm weights): what the step is given does not
    depend on the model's own initialiser, and no per-parameter random kernels need compiling."""
    abstract = abstract_model(config)
    graphdef, params_state = nnx.split(abstract, nnx.Param)
    rng = np.random.RandomState(seed)
    flat = {}
    for path, var in nnx.to_flat_state(params_state):
        if "norm" in var.get_metadata()["logical_axes"]:
            flat[path] = jnp.ones(var.shape, var.dtype)
        else:
            flat[path] = jnp.asarray(config.options.init_std * rng.randn(*var.shape), var.dtype)
    return graphdef, params_state, traverse_util.unflatten_dict(flat)


class Setup:
    def __init__(self, config, settings=SETTINGS):
        self.config = config
        self.graphdef, self.params_state, self.params = random_params(config)
        self.optimizer = make_optimizer(settings, decay_mask(self.params_state))
        build = ModelBuilder(self.graphdef, self.params_state)
        self.step = jax.jit(make_train_step(build, self.optimizer, make_schedule(settings), 1024))
        self._init = jax.jit(self.optimizer.init)

    def state(self, params=None):
        params = self.params if params is None else params
        rng = jax.random.key_data(jax.random.key(0))
        return TrainState(jnp.int32(0), params, self._init(params), rng, jnp.int32(-1))


def _pattern_batches(n_steps, batch, seq_len, seed=1):
    """Learnable sequences: token t+1 = perm[token t] over 64 symbols (ids 3..66), random starts."""
    r = np.random.RandomState(seed)
    perm = r.permutation(64) + 3
    cur = r.randint(0, 64, (n_steps, batch)) + 3
    seq = [cur]
    for _ in range(seq_len):
        seq.append(perm[seq[-1] - 3])
    return np.stack(seq, -1).astype(np.int32)  # [n_steps, batch, seq_len + 1]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the training tests of a session (subprocesses included)."""
    from deepseekmoe_jax.train.placement import enable_compilation_cache

    path = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    enable_compilation_cache(path)
    return path


@pytest.fixture(scope="module")
def setup():
    return Setup(CONFIG)


def test_grad_accumulation_equals_one_large_batch(setup):
    # Plain SGD with learning rate 1: the update is minus the gradient, so the new parameters compare gradients.
    sgd = optax.sgd(1.0)
    build = ModelBuilder(setup.graphdef, setup.params_state)
    step = jax.jit(make_train_step(build, sgd, make_schedule(SETTINGS), 1024))
    rng = jax.random.key_data(jax.random.key(0))
    state = lambda: TrainState(jnp.int32(0), setup.params, sgd.init(setup.params), rng, jnp.int32(-1))
    tokens = np.random.RandomState(0).randint(3, CONFIG.vocab_size, (8, 33)).astype(np.int32)
    big, m_big = step(state(), jnp.asarray(tokens[None]))  # [1, 8, 33]: one batch of 8
    acc, m_acc = step(state(), jnp.asarray(tokens.reshape(4, 2, 33)))  # 4 micro-batches of 2
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "dropped_fraction", "load_imbalance"):
        np.testing.assert_allclose(m_acc[key], m_big[key], rtol=2e-6, atol=1e-7, err_msg=key)
    assert float(m_big["aux_loss"]) > 0 and float(m_big["grad_norm"]) > 0
    grad_big = jax.tree.map(lambda new, old: old - new, big.params, setup.params)
    grad_acc = jax.tree.map(lambda new, old: old - new, acc.params, setup.params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_big))
    assert scale > 1e-3
    for a, b in zip(jax.tree.leaves(grad_acc), jax.tree.leaves(grad_big), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    assert int(big.step) == int(acc.step) == 1 and int(big.bad_step) == -1


def test_chunked_cross_entropy_matches_full_logits(setup):
    build = ModelBuilder(setup.graphdef, setup.params_state)
    rng = np.random.RandomState(2)
    hidden = jnp.asarray(rng.randn(3, 21, CONFIG.hidden_size).astype(np.float32))
    targets = jnp.asarray(rng.randint(0, CONFIG.vocab_size, (3, 21)).astype(np.int32))
    mask = jnp.asarray((rng.rand(3, 21) > 0.3).astype(np.float32))
    lm_head = setup.params["lm_head"]

    def full(kernel, h):
        logp = jax.nn.log_softmax(jnp.einsum("bth,hv->btv", h, kernel), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)

    def chunked(kernel, h, chunk):
        return chunked_nll(build({**setup.params, "lm_head": kernel}), h, targets, mask, chunk)

    ref, ref_grads = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(lm_head, hidden)
    for chunk in (4, 7):  # 21 positions: 6 chunks of 4 with padding; exactly 3 chunks of 7
        fn = jax.jit(jax.value_and_grad(lambda k, h, c=chunk: chunked(k, h, c)[0], argnums=(0, 1)))
        val, grads = fn(lm_head, hidden)
        np.testing.assert_allclose(val, ref, rtol=1e-5)
        for a, b in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jax.jit(lambda k, h: chunked(k, h, 4)[1])(lm_head, hidden)) == float(mask.sum())


def test_non_finite_loss_skips_the_update_and_records_the_step(setup):
    params, step = dict(setup.params), setup.step
    params["model"] = dict(params["model"])
    emb = np.array(params["model"]["embed_tokens"])
    emb[5] = np.nan  # any batch containing token 5 gives a NaN loss
    params["model"]["embed_tokens"] = jnp.asarray(emb)
    good = np.full((1, 8, 33), 7, np.int32)
    bad = good.copy()
    bad[0, 3, 10] = 5
    state = setup.state(params)
    state, m = step(state, jnp.asarray(good))
    assert int(state.bad_step) == -1 and np.isfinite(float(m["loss"]))
    before = jax.tree.map(np.asarray, state.params)
    state, m = step(state, jnp.asarray(bad))
    assert int(state.step) == 2 and int(state.bad_step) == 2 and np.isnan(float(m["loss"]))
    state, m = step(state, jnp.asarray(good))  # after a bad step, nothing moves any more
    assert int(state.step) == 3 and int(state.bad_step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def _collapse(params: dict, hidden: int) -> dict:
    """Bias every token and the router so that experts 0 and 1 take all top-2 choices: a shared direction is
    added to all embeddings and aligned with those experts' gate columns."""
    rng = np.random.RandomState(0)
    base = rng.randn(hidden).astype(np.float32)
    base /= np.linalg.norm(base)
    params["model"]["embed_tokens"] = jnp.asarray(np.asarray(params["model"]["embed_tokens"]) + 0.05 * base)
    for seg in params["model"]["segments"].values():
        for layer in seg["layers"].values():
            if "gate" in layer["mlp"]:
                k = np.array(layer["mlp"]["gate"]["kernel"])  # [repeats, H, E]
                k[..., 0] += base
                k[..., 1] += 0.8 * base
                layer["mlp"]["gate"]["kernel"] = jnp.asarray(k)
    return params


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_balance_loss_spreads_a_collapsed_router(alpha, setup):
    s = setup if alpha == CONFIG.aux_loss_alpha else Setup(CONFIG.replace(aux_loss_alpha=alpha))
    step = s.step
    state = s.state(_collapse(jax.tree.map(lambda x: x, s.params), CONFIG.hidden_size))
    data = _pattern_batches(30, 8, 32)
    imbalance, lm = [], []
    for i in range(30):
        state, m = step(state, jnp.asarray(data[i][None]))
        imbalance.append(float(m["load_imbalance"][0]))
        lm.append(float(m["lm_loss"]))
    # Fully collapsed at the start: two experts hold every choice, max/mean load = (1/2) / (1/8) = 4.
    assert imbalance[0] == pytest.approx(4.0)
    assert lm[-1] < 0.6 * lm[0]  # the model learns the pattern either way
    late = float(np.mean(imbalance[-10:]))
    if alpha > 0:
        assert late < 2.0, imbalance
    else:
        assert late > 3.0, imbalance  # without the balance loss the router stays collapsed


def test_bfloat16_compute_keeps_float32_master_weights(setup):
    bf16 = Setup(CONFIG.with_options(dtype="bfloat16"))  # param_dtype stays float32
    tokens = jnp.asarray(_pattern_batches(1, 8, 32)[0][None])
    new16, m16 = bf16.step(bf16.state(setup.params), tokens)
    new32, m32 = setup.step(setup.state(), tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new16.params))
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(new16.opt_state) if m.ndim)
    np.testing.assert_allclose(m16["lm_loss"], m32["lm_loss"], rtol=2e-2)
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=0.1)
    # The first Adam update moves each float32 master weight by about the learning rate (3e-3).
    delta = np.abs(np.asarray(new16.params["lm_head"]) - np.asarray(setup.params["lm_head"]))
    assert 1e-3 < np.median(delta) < 6e-3


def test_stop_vote_flags_are_built_once_and_carry_the_request():
    from deepseekmoe_jax.sharding import make_mesh
    from deepseekmoe_jax.train.signals import StopVote, with_stop_vote

    mesh = make_mesh(data=2, fsdp=4)
    vote = StopVote(mesh)
    assert vote.flags(False) is vote.flags(False) and vote.flags(True) is vote.flags(True)
    assert vote.flags(True).sharding == vote.sharding and vote.flags(True).shape == (8,)
    np.testing.assert_array_equal(np.asarray(vote.flags(False)), np.zeros(8, np.int32))
    np.testing.assert_array_equal(np.asarray(vote.flags(True)), np.ones(8, np.int32))
    step = jax.jit(with_stop_vote(lambda state, batch: (state + batch, batch)))
    for requested in (False, True, False):
        state, _, any_stop = step(jnp.float32(0), jnp.float32(1), vote.flags(requested))
        vote.record(any_stop)
    # The decision lags one dispatched step: after (no, yes, no) it reports the middle step's request.
    assert vote.agreed()
