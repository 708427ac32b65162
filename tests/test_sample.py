"""Sampling: greedy decoding against a teacher-forced forward pass, nucleus/top-k filtering, the CLI on saved runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx, traverse_util

from deepseekmoe_jax import sample as sample_lib
from deepseekmoe_jax.checkpoint import save_params, write_config_files
from deepseekmoe_jax.model import abstract_model
from deepseekmoe_jax.tokenizer import ByteTokenizer

CONFIG = small_config(vocab_size=260, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_model(config=CONFIG, std=0.3, seed=0):
    """A model with numpy-drawn weights, large enough that its predictions differ from token to token."""
    abstract = abstract_model(config)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.RandomState(seed)
    flat = {}
    for path, var in nnx.to_flat_state(params):
        norm = "norm" in var.get_metadata()["logical_axes"]
        flat[path] = jnp.ones(var.shape) if norm else jnp.asarray(std * rng.randn(*var.shape), jnp.float32)
    nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(flat))
    return nnx.merge(graphdef, params, rest)


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_greedy_equals_teacher_forced_argmax(model):
    prompt = [10, 20, 30, 40, 50]
    new = sample_lib.generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert len(new) == 12 and len(set(new)) > 1
    # Independent check: one forward pass over prompt + continuation; the argmax after each prefix must be the
    # token that was generated there (causal model: later tokens do not change earlier logits).
    seq = jnp.asarray([prompt + new], jnp.int32)
    logits = model(seq, training=False).logits[0]
    predicted = np.asarray(jnp.argmax(logits[len(prompt) - 1 : -1], axis=-1)).tolist()
    assert predicted == new


def test_generation_stops_at_eos(model):
    prompt = [10, 20, 30, 40, 50]
    new = sample_lib.generate(model, prompt, max_new_tokens=12, temperature=0.0)
    stop = new[4]
    cut = sample_lib.generate(model, prompt, max_new_tokens=12, temperature=0.0, eos_id=stop)
    assert cut == new[: new.index(stop)]


def test_sampling_is_seeded(model):
    prompt = [10, 20, 30]
    a = sample_lib.generate(model, prompt, max_new_tokens=12, temperature=1.5, top_p=1.0, seed=1)
    b = sample_lib.generate(model, prompt, max_new_tokens=12, temperature=1.5, top_p=1.0, seed=1)
    c = sample_lib.generate(model, prompt, max_new_tokens=12, temperature=1.5, top_p=1.0, seed=2)
    assert a == b and a != c


def test_filter_logits():
    logits = jnp.log(jnp.asarray([0.5, 0.05, 0.3, 0.15]))
    kept = lambda x: np.flatnonzero(np.isfinite(np.asarray(x))).tolist()
    assert kept(sample_lib.filter_logits(logits, 1.0, 2, 1.0)) == [0, 2]
    assert kept(sample_lib.filter_logits(logits, 1.0, 0, 0.5)) == [0]  # 0.5 alone reaches 0.5
    assert kept(sample_lib.filter_logits(logits, 1.0, 0, 0.7)) == [0, 2]  # 0.5 + 0.3 >= 0.7
    assert kept(sample_lib.filter_logits(logits, 1.0, 0, 0.81)) == [0, 2, 3]
    np.testing.assert_allclose(sample_lib.filter_logits(logits, 2.0, 0, 1.0), logits / 2.0)
    probs = jax.nn.softmax(sample_lib.filter_logits(logits, 1.0, 0, 0.7))
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0, 0.3 / 0.8, 0], atol=1e-6)


def _save_run(model, run_dir, tokenizer_desc):
    """A run directory as train.py lays it out: RUN/config files + RUN/checkpoints/<step>/params."""
    run_dir.mkdir()
    write_config_files(run_dir, model.config, {"tokenizer": tokenizer_desc} if tokenizer_desc else None)
    for step in (3, 12):
        (run_dir / "checkpoints" / str(step)).mkdir(parents=True)
        save_params(model, run_dir / "checkpoints" / str(step))


def test_cli_samples_from_a_run_directory(model, tmp_path, capsys):
    run = tmp_path / "run"
    _save_run(model, run, ByteTokenizer().describe())
    assert sample_lib.resolve_checkpoint(run) == str(run / "checkpoints" / "12")
    args = ["--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]
    assert sample_lib.main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and "checkpoints/12" in err
    # The printed continuation is the byte decoding of the greedy ids.
    new = sample_lib.generate(model, ByteTokenizer().encode("def ").tolist(), max_new_tokens=8, temperature=0.0)
    assert out == "def " + ByteTokenizer().decode(new) + "\n"


def test_cli_with_a_tokenizer_json(model, tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["hello world, hello there"] * 10, trainer)
    assert tok.get_vocab_size() <= CONFIG.vocab_size
    run = tmp_path / "run"
    _save_run(model, run, None)
    tok.save(str(run / "tokenizer.json"))  # found next to the config files
    assert sample_lib.main(["--checkpoint", str(run), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_cli_errors(model, tmp_path, capsys):
    assert sample_lib.main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    run = tmp_path / "run"
    _save_run(model, run, None)
    assert sample_lib.main(["--checkpoint", str(run), "--prompt", "x"]) == 2
    assert "no tokenizer recorded" in capsys.readouterr().err
    meta = json.loads((run / "deepseekmoe_jax.json").read_text())
    assert "tokenizer" not in meta
