"""Bad input to the converter and the sampler, one case per kind: a clean one-line error (exit 2, no traceback)
that names the file / key / value, and every tree that existed before left exactly as it was; non-finite numbers
never pass ``verify``; staging directories left by a killed writer are cleaned up by the next run.

The CLIs run as users run them: ``deepseekmoe_jax.cli.convert.main(argv)`` and ``deepseekmoe_jax.sample.main(argv)``
in this process (as the other CLI tests do), and one case through ``python -m convert`` in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from badinput import assert_clean_error, tree_digest
from conftest import small_config
from safetensors.torch import load_file, save_file
from test_convert_helpers import ROOT, edit_config, finish, start_cli, write_hf_checkpoint, write_tokenizer_files

from deepseekmoe_jax import sample as sample_lib
from deepseekmoe_jax.checkpoint import save_checkpoint
from deepseekmoe_jax.cli.convert import main as convert_main
from deepseekmoe_jax.hf_weights import iter_targets, model_from_hf_state_dict
from deepseekmoe_jax.param_store import leaf_path
from deepseekmoe_jax.reference import build_reference, reference_state_dict

# eos/bos ids inside the vocabulary: the test tokenizer (w0, w1, ... <unk>) has none of the usual eos strings, so
# sampling from a converted checkpoint has to take them from config.json.
CONFIG = small_config(eos_token_id=1, bos_token_id=0)
NORM_CONFIG = small_config(norm_topk_prob=True, num_experts_per_tok=3, eos_token_id=1, bos_token_id=0)
EMBED = "model.embed_tokens.weight"
INF_KEY = "model.layers.0.mlp.down_proj.weight"  # layer 0 is dense: every token goes through it
FS_PY = os.path.join(ROOT, "deepseekmoe_jax", "fs.py")


def jax_path(config, hf_key: str) -> str:
    """How verify names the JAX parameter that ``hf_key`` is converted into."""
    return "/".join(leaf_path(dict(iter_targets(config))[hf_key].path))


def state_dict(config, seed: int = 0) -> dict:
    return reference_state_dict(build_reference(config, seed=seed), config)


def write_single(directory: str, config, sd: dict) -> str:
    write_hf_checkpoint(directory, config, sd, "safetensors", "float32")
    return directory


def edit_weights(hf_dir: str, edit) -> None:
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def run_convert(capsys, *argv: str) -> tuple[int, str, str]:
    code = convert_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints shared by the whole file (never modified: each case copies what it breaks)."""
    root = tmp_path_factory.mktemp("ckpts")
    sd = state_dict(CONFIG)
    out = {"hf": write_single(str(root / "hf"), CONFIG, sd)}
    assert convert_main(["hf-to-jax", out["hf"], str(root / "jax"), "--no-progress"]) == 0
    out["jax"] = str(root / "jax")
    # The same weights with a NaN embedding, as a JAX model directory (the HF side stays healthy).
    bad = {k: v.clone() for k, v in sd.items()}
    bad[EMBED][:] = float("nan")
    save_checkpoint(model_from_hf_state_dict(CONFIG, bad), str(root / "jax-nan"))
    out["jax-nan"] = str(root / "jax-nan")
    # One inf weight on the HF (PyTorch) side.
    bad = {k: v.clone() for k, v in sd.items()}
    bad[INF_KEY][3, 5] = float("inf")
    out["hf-inf"] = write_single(str(root / "hf-inf"), CONFIG, bad)
    # norm_topk_prob=true: HF checkpoint and its conversion.
    out["hf-norm"] = write_single(str(root / "hf-norm"), NORM_CONFIG, state_dict(NORM_CONFIG, seed=3))
    assert convert_main(["hf-to-jax", out["hf-norm"], str(root / "jax-norm"), "--no-progress"]) == 0
    out["jax-norm"] = str(root / "jax-norm")
    return out


@pytest.fixture
def hf(ckpts, tmp_path) -> str:
    return shutil.copytree(ckpts["hf"], str(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------ the error table
@dataclasses.dataclass(frozen=True)
class Case:
    """``prepare(hf_dir, ckpts, tmp)`` breaks the fresh HF copy ``hf_dir`` (and may create more) and returns
    (argv, the trees that must stay unchanged, the needles the error line must contain)."""

    prepare: object
    cli: str = "convert"  # or "sample"


def _nan_weight(hf_dir, ckpts, tmp):
    edit_weights(hf_dir, lambda t: t[EMBED].__setitem__((2, slice(0, 7)), float("nan")))
    out = str(tmp / "out")
    argv = ["hf-to-jax", hf_dir, out, "--refuse-nonfinite", "--no-progress"]
    return argv, (hf_dir, out), (os.path.join(hf_dir, "model.safetensors"), EMBED, "7 non-finite", "NaN")


def _garbage_dtype(field, value):
    def prepare(hf_dir, ckpts, tmp):
        edit_config(hf_dir, **{field: value})
        out = str(tmp / "out")
        needles = (os.path.join(hf_dir, "config.json"), field, json.dumps(value), '"bfloat16"', '"float32"')
        return ["hf-to-jax", hf_dir, out, "--no-progress"], (hf_dir, out), needles

    return prepare


def _out_inside_input(hf_dir, ckpts, tmp):
    out = os.path.join(hf_dir, "jax")
    return ["hf-to-jax", hf_dir, out, "--no-progress"], (hf_dir,), (out, "lies inside the input", hf_dir)


def _overwrite_a_file_of_the_input(hf_dir, ckpts, tmp):
    out = os.path.join(hf_dir, "tokenizer.json")
    argv = ["hf-to-jax", hf_dir, out, "--overwrite", "--no-progress"]
    return argv, (hf_dir,), (out, "lies inside the input", hf_dir)


def _jax_to_hf_inside_its_checkpoint(hf_dir, ckpts, tmp):
    jax_dir = shutil.copytree(ckpts["jax"], str(tmp / "jax"))
    out = os.path.join(jax_dir, "params", "hf")
    return ["jax-to-hf", jax_dir, out, "--no-progress"], (jax_dir,), (out, "lies inside the input", jax_dir)


def _verify_nan_tolerance(hf_dir, ckpts, tmp):
    return ["verify", hf_dir, ckpts["jax"], "--tolerance", "nan"], (hf_dir,), ("--tolerance", "'nan'", "finite")


def _sample_args(*extra):
    def prepare(hf_dir, ckpts, tmp):
        jax_dir = ckpts["jax"]
        return ["--checkpoint", jax_dir, "--prompt", "w3", "--max-new-tokens", "2", *extra], (jax_dir,), extra

    return prepare


def _sample_bad_dtype(hf_dir, ckpts, tmp):
    argv, roots, _ = _sample_args("--dtype", "int77")(hf_dir, ckpts, tmp)
    return argv, roots, ("--dtype", "int77", "bfloat16", "float32", "float16")


def _sample_id_beyond_vocab(hf_dir, ckpts, tmp):
    tok_dir = tmp / "bigtok"
    tok_dir.mkdir()
    write_tokenizer_files(str(tok_dir), 300)  # w0 .. w298: ids the 96-entry model has no embedding for
    tok = str(tok_dir / "tokenizer.json")
    argv = ["--checkpoint", ckpts["jax"], "--prompt", "w3 w150", "--tokenizer", tok]
    return argv, (ckpts["jax"], str(tok_dir)), ("token id 150", "vocab_size 96", tok)


def _sample_no_eos_anywhere(hf_dir, ckpts, tmp):
    """A converted checkpoint whose tokenizer.json has no usual eos string and whose config has no usable
    eos_token_id: the message says what this command can do (it has no --eos-token)."""
    jax_dir = shutil.copytree(ckpts["jax"], str(tmp / "jax"))
    edit_config(jax_dir, eos_token_id=None)
    argv = ["--checkpoint", jax_dir, "--prompt", "w3"]
    return argv, (jax_dir,), (os.path.join(jax_dir, "tokenizer.json"), "eos", "eos_token_id", "--tokenizer")


CASES = {
    "hf-to-jax --refuse-nonfinite: a NaN weight": Case(_nan_weight),
    "torch_dtype float77": Case(_garbage_dtype("torch_dtype", "float77")),
    "torch_dtype 5": Case(_garbage_dtype("torch_dtype", 5)),
    "torch_dtype a list": Case(_garbage_dtype("torch_dtype", ["bfloat16"])),
    "dtype float77": Case(_garbage_dtype("dtype", "float77")),
    "hf-to-jax output inside the input": Case(_out_inside_input),
    "hf-to-jax --overwrite a file inside the input": Case(_overwrite_a_file_of_the_input),
    "jax-to-hf output inside the checkpoint": Case(_jax_to_hf_inside_its_checkpoint),
    "verify --tolerance nan": Case(_verify_nan_tolerance),
    "sample --dtype int77": Case(_sample_bad_dtype, "sample"),
    "sample --temperature nan": Case(_sample_args("--temperature", "nan"), "sample"),
    "sample --temperature inf": Case(_sample_args("--temperature", "inf"), "sample"),
    "sample --top-p nan": Case(_sample_args("--top-p", "nan"), "sample"),
    "sample: prompt id beyond the vocabulary": Case(_sample_id_beyond_vocab, "sample"),
    "sample: no eos token anywhere": Case(_sample_no_eos_anywhere, "sample"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clean_line_and_changes_nothing(name, ckpts, hf, tmp_path, capsys):
    case = CASES[name]
    argv, roots, needles = case.prepare(hf, ckpts, tmp_path)
    before = tree_digest(*roots, tmp_path)
    try:
        code = (convert_main if case.cli == "convert" else sample_lib.main)(argv)
    except SystemExit as e:  # a usage error found by argparse
        code = e.code
    err = capsys.readouterr().err
    line = assert_clean_error(code, err, *needles)
    assert "--eos-token" not in line or case.cli != "sample", line  # the sampler has no such option
    assert tree_digest(*roots, tmp_path) == before


def test_refused_nonfinite_through_the_console_command(hf, tmp_path):
    """As a user runs it: ``python -m convert`` in its own process, no traceback, nothing left behind."""
    edit_weights(hf, lambda t: t[INF_KEY].__setitem__((0, 0), float("inf")))
    out = str(tmp_path / "out")
    before = tree_digest(tmp_path)
    code, _, err = finish(start_cli("hf-to-jax", hf, out, "--refuse-nonfinite", "--no-progress"))
    assert_clean_error(code, err, INF_KEY, "1 non-finite", "model.safetensors")
    assert tree_digest(tmp_path) == before


# -------------------------------------------------------------------------------- warnings, verify, leaks
def test_nonfinite_weights_warn_with_key_and_count(hf, tmp_path, capsys):
    def edit(t):
        t[EMBED][1, :3] = float("nan")
        t[INF_KEY][0, 0] = float("-inf")

    edit_weights(hf, edit)
    code, _, err = run_convert(capsys, "hf-to-jax", hf, str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any(EMBED in w and "3 non-finite" in w for w in warnings), err
    assert any(INF_KEY in w and "1 non-finite" in w for w in warnings), err
    assert any("--refuse-nonfinite" in w for w in warnings), err


def _verify(capsys, hf_dir, jax_dir, *extra):
    code, out, err = run_convert(capsys, "verify", hf_dir, jax_dir, "--batches", "1", *extra)
    assert "Traceback" not in err
    return code, out


def test_verify_fails_on_a_nan_embedding_naming_the_jax_parameter(ckpts, capsys):
    code, out = _verify(capsys, ckpts["hf"], ckpts["jax-nan"])
    assert code == 1 and "PASS" not in out, out
    fail = [line for line in out.splitlines() if line.startswith("FAIL: JAX")]
    assert fail and "non-finite" in fail[0] and jax_path(CONFIG, EMBED) in fail[0], out


def test_verify_fails_on_one_inf_weight_naming_the_hf_key(ckpts, capsys):
    code, out = _verify(capsys, ckpts["hf-inf"], ckpts["jax"])
    assert code == 1 and "PASS" not in out, out
    fail = [line for line in out.splitlines() if line.startswith("FAIL: PyTorch")]
    assert fail and "non-finite" in fail[0] and INF_KEY in fail[0], out


def test_verify_checks_norm_topk_prob_models(ckpts, tmp_path, capsys):
    code, out = _verify(capsys, ckpts["hf-norm"], ckpts["jax-norm"])
    assert code == 0 and out.startswith("PASS"), out
    # The same model with one perturbed router weight on the HF side: the check notices.
    hf = shutil.copytree(ckpts["hf-norm"], str(tmp_path / "hf"))
    edit_weights(hf, lambda t: t["model.layers.2.mlp.gate.weight"].mul_(3.0))
    code, out = _verify(capsys, hf, ckpts["jax-norm"])
    assert code == 1 and out.startswith("FAIL"), out


def _staging_dir_of(target: str, *, live: bool) -> tuple[str, subprocess.Popen | None]:
    """A staging directory for ``target`` made by another process with the library's own naming (host + pid),
    holding a partial file: the process has exited (a killed writer) or, with ``live``, is still running."""
    code = (
        "import importlib.util, sys, os, time\n"
        f"spec = importlib.util.spec_from_file_location('fs', {FS_PY!r})\n"
        "fs = importlib.util.module_from_spec(spec); spec.loader.exec_module(fs)\n"
        f"tmp = fs.make_staging_dir({target!r})\n"
        "open(os.path.join(tmp, 'partial.bin'), 'wb').write(b'x' * 1000)\n"
        "print(tmp, flush=True)\n" + ("time.sleep(120)\n" if live else "")
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    if not live:
        proc.wait(timeout=60)
        return path, None
    return path, proc


@pytest.mark.parametrize("writer", ["hf-to-jax", "save_checkpoint"])
def test_stale_staging_is_removed_and_reported(writer, ckpts, tmp_path, capsys):
    target = str(tmp_path / "out")
    dead, _ = _staging_dir_of(target, live=False)
    alive, proc = _staging_dir_of(target, live=True)
    try:
        assert os.path.isdir(dead) and os.path.isdir(alive) and dead != alive
        if writer == "hf-to-jax":
            code, _, err = run_convert(capsys, "hf-to-jax", ckpts["hf"], target, "--no-progress")
            assert code == 0, err
        else:
            save_checkpoint(
                model_from_hf_state_dict(CONFIG, load_file(os.path.join(ckpts["hf"], "model.safetensors"))), target
            )
            err = capsys.readouterr().err
        assert not os.path.exists(dead)
        assert [line for line in err.splitlines() if dead in line and "removed" in line], err
        assert os.path.isdir(alive) and alive not in err  # a live writer's directory is left alone
        assert os.path.isdir(os.path.join(target, "params"))
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------- sampling
def test_sample_converted_checkpoint_uses_config_eos_and_bos(ckpts, capsys):
    """The converted checkpoint's tokenizer.json has none of the usual eos strings; config.json's ids serve."""
    argv = ["--checkpoint", ckpts["jax"], "--prompt", "w3 w4", "--max-new-tokens", "3", "--temperature", "0"]
    assert sample_lib.main(argv) == 0
    out, err = capsys.readouterr()
    assert "error" not in err and out.strip()
    tok = sample_lib.checkpoint_tokenizer(ckpts["jax"], CONFIG)
    assert (tok.eos_id, tok.bos_id) == (1, 0)


def test_prepare_hint_still_names_its_option(tmp_path):
    """train.py prepare has --eos-token; its message keeps naming it (the sampler passes its own hint)."""
    from deepseekmoe_jax.tokenizer import TokenizerError, tokenizer_from_arg

    write_tokenizer_files(str(tmp_path), 10)
    with pytest.raises(TokenizerError, match="--eos-token"):
        tokenizer_from_arg(str(tmp_path / "tokenizer.json"))


def test_reference_renormalises_top_k_for_norm_topk_prob():
    """The reference with norm_topk_prob agrees with the JAX model and differs from the reference without it."""
    from deepseekmoe_jax.reference import compare_with_reference, reference_logits, relative_max_diff

    assert max(compare_with_reference(NORM_CONFIG, (0,))) <= 1e-4
    ids = np.random.default_rng(0).integers(0, NORM_CONFIG.vocab_size, (2, 8))
    with torch.no_grad():
        renorm = reference_logits(build_reference(NORM_CONFIG, seed=1), ids)
        plain = reference_logits(build_reference(NORM_CONFIG.replace(norm_topk_prob=False), seed=1), ids)
    assert relative_max_diff(renorm, plain) > 1e-2
