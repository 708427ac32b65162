"""`train.py` as users run it: the built-in default run and the ``prepare`` subcommand, as real subprocesses."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np

from deepseekmoe_jax.checkpoint import load_checkpoint
from deepseekmoe_jax.train.data import TokenDataset


def _run(repo_root, args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, str(repo_root / "train.py"), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(repo_root)),
        cwd=str(cwd),
        timeout=timeout,
    )


def test_the_default_run(repo_root, tmp_path, tmp_path_factory):
    """No --config: configs/tiny.yaml on the built-in Python-stdlib corpus, in the working directory's runs/tiny.
    Shortened to 3 steps without evaluation; it prepares the corpus, trains, saves and says how to sample."""
    cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    proc = _run(
        repo_root,
        ["--steps", "3", "--set", "train.eval_every=-1", "--set", f"train.compilation_cache={cache}", "--no-progress"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert any(line.startswith(f"config: {repo_root / 'configs' / 'tiny.yaml'} with ") for line in out)
    assert any(line.startswith("preparing the built-in corpus: ") for line in out)
    assert any(line.startswith("step      3 | loss ") for line in out)
    ckpt = os.path.join("runs", "tiny", "checkpoints", "3")
    assert out[-3:] == [
        f"checkpoint: {ckpt}",
        "sample from it:",
        f"  python -m deepseekmoe_jax.sample --checkpoint {ckpt} --prompt {shlex.quote('def ')}",
    ]
    model = load_checkpoint(tmp_path / ckpt)  # the printed path, relative to where the command ran
    assert model.config.hidden_size == 128 and model.config.vocab_size == 512
    data = TokenDataset(tmp_path / "runs" / "tiny" / "data")
    assert data.tokenizer["type"] == "bytes" and data.split("train").num_tokens > 100_000
    with open(tmp_path / "runs" / "tiny" / "checkpoints" / "3" / "train_state" / "metadata", encoding="utf-8") as f:
        assert json.load(f)["data_position"] == 3 * 8


def test_prepare_command(repo_root, tmp_path, cli, capsys):
    text = "héllo, world\n" * 3
    (tmp_path / "notes.txt").write_text(text, encoding="utf-8")
    proc = _run(
        repo_root,
        ["prepare", "--input", "notes.txt", "--output", "data", "--tokenizer", "bytes", "--val-fraction", "0"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(text.encode("utf-8")) + 1
    assert proc.stdout.strip() == (
        f"wrote data: train {n} tokens (1 documents), held-out 0 tokens (0 documents), uint16, vocab 259, eos id 2"
    )
    ds = TokenDataset(tmp_path / "data")
    assert ds.meta["dtype"] == "uint16" and ds.eos_id == 2 and ds.meta["bos_id"] == 1
    expected = np.concatenate([np.frombuffer(text.encode("utf-8"), np.uint8) + 3, [2]])
    np.testing.assert_array_equal(np.asarray(ds.split("train").tokens), expected)
    assert ds.split("train").max_token_id == expected.max() and ds.split("val").num_tokens == 0
    before = (tmp_path / "data" / "train.bin").read_bytes()

    # An existing dataset is not replaced without --overwrite: exit status 2, a message, the data intact.
    args = ["--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "data"), "--tokenizer", "bytes"]
    code = cli.main(["prepare", *args, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists; choose another --output or pass --overwrite" in err
    assert (tmp_path / "data" / "train.bin").read_bytes() == before
