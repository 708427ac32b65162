"""Bad input to ``train.py`` / ``train.py prepare`` / config files: one ``error:`` line naming the file, key and value,
exit status 2, no traceback, and every file that existed before left exactly as it was.

Each case calls ``train.py``'s ``main(argv)`` in this process; all of them fail before anything is compiled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from badinput import assert_clean_error, tree_digest

from deepseekmoe_jax import fs
from deepseekmoe_jax.config_files import read_config_file
from deepseekmoe_jax.tokenizer import ByteTokenizer
from deepseekmoe_jax.train import data as data_lib
from deepseekmoe_jax.train.data import prepare
from deepseekmoe_jax.train.settings import load_run_config
from deepseekmoe_jax.validation import ConfigError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _write_corpus(root) -> None:
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"doc{i}.txt").write_text(" ".join(WORDS[(i + j) % 10] for j in range(150)) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A valid byte-level dataset with enough tokens for one batch of configs/tiny.yaml (8 x 128)."""
    root = tmp_path_factory.mktemp("bad_input_data")
    _write_corpus(root / "corpus")
    prepare([str(root / "corpus")], root / "data", ByteTokenizer(), val_fraction=0.2, progress=False)
    return root / "data"


def run(cli, capsys, argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_args(tmp_path, *extra):
    """A train.py command on configs/tiny.yaml that writes nothing outside ``tmp_path``."""
    return [
        "--set",
        f"train.run_dir={tmp_path / 'run'}",
        "--set",
        "train.compilation_cache=null",
        "--no-progress",
        *extra,
    ]


@pytest.fixture
def no_training(monkeypatch):
    """The training loop replaced by a failure: these cases must be refused while the config is read."""
    import deepseekmoe_jax.train as train_pkg

    def refuse(*_a, **_k):
        raise AssertionError("the config was accepted and training started")

    monkeypatch.setattr(train_pkg, "train", refuse)


# ----------------------------------------------------------------------------------------------- 1. data loss
@pytest.mark.parametrize(
    "inputs, output, how",
    [
        (["corpus"], "corpus", "is"),  # the input itself
        (["corpus/docs"], "corpus", "contains"),  # a parent of the input
        (["corpus"], "corpus/docs/out", "lies inside"),  # a directory inside the input
        (["corpus/docs/a.txt"], "corpus/docs", "contains"),  # the directory of an input file
        (["link"], "corpus", "is"),  # the input through a symbolic link
    ],
    ids=["same", "parent", "inside", "file-parent", "symlink"],
)
def test_prepare_refuses_an_output_overlapping_an_input(cli, capsys, tmp_path, inputs, output, how):
    (tmp_path / "corpus" / "docs").mkdir(parents=True)
    (tmp_path / "corpus" / "docs" / "a.txt").write_text("some text\n" * 20)
    (tmp_path / "corpus" / "b.txt").write_text("more text\n" * 20)
    os.symlink(tmp_path / "corpus", tmp_path / "link")
    before = tree_digest(tmp_path)
    argv = ["prepare", "--input", *(tmp_path / i for i in inputs), "--output", tmp_path / output]
    code, _, err = run(cli, capsys, [*argv, "--tokenizer", "bytes", "--overwrite", "--no-progress"])
    assert_clean_error(code, err, f"--output {tmp_path / output} {how} the input", "outside the inputs")
    assert tree_digest(tmp_path) == before  # the corpus is byte-identical


def test_overwrite_replaces_only_a_dataset(cli, capsys, tmp_path):
    _write_corpus(tmp_path / "corpus")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("not a dataset")
    before = tree_digest(tmp_path)
    argv = ["prepare", "--input", tmp_path / "corpus", "--output", tmp_path / "notes", "--tokenizer", "bytes"]
    code, _, err = run(cli, capsys, [*argv, "--overwrite", "--no-progress"])
    assert_clean_error(code, err, str(tmp_path / "notes"), "not a dataset")
    assert tree_digest(tmp_path) == before


def test_overwrite_still_replaces_a_dataset(cli, capsys, tmp_path):
    _write_corpus(tmp_path / "corpus")
    argv = ["prepare", "--input", tmp_path / "corpus", "--output", tmp_path / "data", "--tokenizer", "bytes"]
    assert run(cli, capsys, [*argv, "--no-progress"])[0] == 0
    (tmp_path / "corpus" / "extra.txt").write_text("one more document\n")
    code, out, err = run(cli, capsys, [*argv, "--no-progress", "--overwrite"])
    assert code == 0, err
    assert _meta(tmp_path / "data")["sources"]["files"] == 7
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]  # no staging or moved-aside directory left


# ----------------------------------------------------------------------------------------------- 2. YAML numbers
@pytest.mark.parametrize(
    "text, value",
    [("1e-5", 1e-5), ("1E5", 1e5), ("-2e-3", -2e-3), ("1_000", 1000), (".5", 0.5), ("+1.0e+3", 1e3), ("3.", 3.0)],
)
def test_config_files_read_every_spelling_of_a_number(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  x: {text}\n")
    assert read_config_file(path)["train"]["x"] == value
    assert not isinstance(read_config_file(path)["train"]["x"], str)


def test_learning_rate_and_eps_without_a_dot(repo_root, tmp_path, cli, capsys, dataset, monkeypatch):
    text = (repo_root / "configs" / "tiny.yaml").read_text()
    text = text.replace("learning_rate: 3.0e-3", "learning_rate: 1e-5\n  eps: 1e-8")
    path = tmp_path / "x.yaml"
    path.write_text(text)
    run_config = load_run_config(path)
    assert run_config.train.learning_rate == 1e-5 and run_config.train.eps == 1e-8
    seen = _fake_train(monkeypatch)
    code, _, err = run(cli, capsys, ["--config", path, *train_args(tmp_path, "--data", dataset)])
    assert code == 0, err
    assert seen[0].train.learning_rate == 1e-5 and seen[0].train.eps == 1e-8


def test_duplicate_keys_are_refused(cli, capsys, tmp_path, no_training):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  vocab_size: 512\ntrain:\n  steps: 10\n  learning_rate: 1e-3\n  steps: 20\n")
    code, _, err = run(cli, capsys, ["--config", path, *train_args(tmp_path)])
    assert_clean_error(code, err, str(path), "line 6", "duplicate key 'steps'", "first at line 4")
    json_path = tmp_path / "dup.json"
    json_path.write_text('{"model": {"vocab_size": 512, "vocab_size": 600}}')
    code, _, err = run(cli, capsys, ["--config", json_path, *train_args(tmp_path)])
    assert_clean_error(code, err, str(json_path), "duplicate key 'vocab_size'")


# ----------------------------------------------------------------------------------------------- 3. no tracebacks
def _meta(d):
    return json.loads((d / "dataset.json").read_text())


def _set_meta(d, meta):
    (d / "dataset.json").write_text(json.dumps(meta))


def _damage(kind, d):
    meta = _meta(d)
    if kind == "not-utf8":
        (d / "dataset.json").write_bytes(b'{"format": "\xff\xfe"}')
    elif kind == "missing-key":
        del meta["vocab_size"]
        _set_meta(d, meta)
    elif kind == "bad-dtype":
        meta["dtype"] = "int8"
        _set_meta(d, meta)
    elif kind == "list":
        (d / "dataset.json").write_text("[1, 2, 3]")
    elif kind == "split-not-object":
        meta["splits"]["train"] = 5
        _set_meta(d, meta)
    elif kind == "split-bad-tokens":
        meta["splits"]["train"]["tokens"] = "many"
        _set_meta(d, meta)
    elif kind == "split-bad-file":
        meta["splits"]["train"]["file"] = "../elsewhere.bin"
        _set_meta(d, meta)
    elif kind == "missing-bin":
        os.remove(d / "train.bin")
    elif kind == "odd-size":
        with open(d / "train.bin", "ab") as f:
            f.write(b"\x01")


DAMAGE = [
    ("not-utf8", ["dataset.json", "not UTF-8"]),
    ("missing-key", ["dataset.json", "'vocab_size' is missing"]),
    ("bad-dtype", ["dataset.json", "'dtype' is 'int8'", "uint16"]),
    ("list", ["dataset.json", "expected a JSON object, found a list"]),
    ("split-not-object", ["dataset.json", "'splits.train' is 5"]),
    ("split-bad-tokens", ["dataset.json", "'splits.train.tokens' is 'many'"]),
    ("split-bad-file", ["dataset.json", "'splits.train.file' is '../elsewhere.bin'"]),
    ("missing-bin", ["train.bin", "found no file"]),
    ("odd-size", ["train.bin", "not a whole number of 2-byte uint16 tokens"]),
]


@pytest.mark.parametrize("kind, needles", DAMAGE, ids=[k for k, _ in DAMAGE])
def test_a_damaged_dataset_is_named(cli, capsys, tmp_path, dataset, kind, needles):
    d = tmp_path / "data"
    shutil.copytree(dataset, d)
    _damage(kind, d)
    before = tree_digest(d)
    code, _, err = run(cli, capsys, train_args(tmp_path, "--data", d))
    assert_clean_error(code, err, str(d), *needles)
    assert tree_digest(d) == before


@pytest.mark.parametrize("run_dir, existing", [("run", False), ("runs/tiny", False), ("run", True)])
def test_a_dataset_error_leaves_no_run_directory(cli, capsys, tmp_path, dataset, run_dir, existing):
    """The run directory is created (and locked) before the data is read; a run refused for its data removes what
    it created (the lock file and the directories, parents included) and leaves an existing one as it was."""
    d = tmp_path / "data"
    shutil.copytree(dataset, d)
    _damage("missing-bin", d)
    if existing:
        (tmp_path / run_dir).mkdir(parents=True)
    before = tree_digest(tmp_path)
    argv = ["--set", f"train.run_dir={tmp_path / run_dir}", "--set", "train.compilation_cache=null", "--no-progress"]
    code, _, err = run(cli, capsys, [*argv, "--data", d])
    assert_clean_error(code, err, str(d), "train.bin", "found no file")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    "name, content, needles",
    [
        ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', ["bad.jsonl:2: column 14: not UTF-8", "0xe9"]),
        ("latin1.txt", b"first line\nna\xefve\n", ["latin1.txt", "line 2, column 3", "not UTF-8", "0xef"]),
        ("null.jsonl", b'{"text": null}\n', ["null.jsonl:1", "string field 'text'"]),
    ],
    ids=["jsonl-not-utf8", "text-not-utf8", "jsonl-not-a-string"],
)
def test_prepare_names_a_bad_input_file(cli, capsys, tmp_path, name, content, needles):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("good text\n")
    (tmp_path / "in" / name).write_bytes(content)
    before = tree_digest(tmp_path)
    argv = ["prepare", "--input", tmp_path / "in", "--output", tmp_path / "out" / "data", "--tokenizer", "bytes"]
    code, _, err = run(cli, capsys, [*argv, "--no-progress"])
    assert_clean_error(code, err, *needles)
    assert tree_digest(tmp_path) == before  # no staging directory, no parent directory left behind


def test_a_binary_config_file(cli, capsys, tmp_path, no_training):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xff")
    code, _, err = run(cli, capsys, ["--config", path, *train_args(tmp_path)])
    assert_clean_error(code, err, str(path), "not UTF-8")
    path.write_bytes(b"train:\n  steps: 3\x00\n")
    code, _, err = run(cli, capsys, ["--config", path, *train_args(tmp_path)])
    assert_clean_error(code, err, str(path), "cannot parse")
    code, _, err = run(cli, capsys, ["--config", tmp_path, *train_args(tmp_path)])
    assert_clean_error(code, err, str(tmp_path), "is a directory")


BAD_SETTINGS = [
    # 3. values that used to give tracebacks or messages naming no key
    ("train.seed=abc", "train.seed='abc'", "expected an integer in [0, 2147483647]"),
    ("train.seed=-1", "train.seed=-1", "expected an integer in [0, 2147483647]"),
    ("train.seed=2147483648", "train.seed=2147483648", "expected an integer in [0, 2147483647]"),
    ("train.run_dir=5", "train.run_dir=5", "expected a non-empty string"),
    ("data.path=5", "data.path=5", "expected a non-empty string or null"),
    ("train.compilation_cache=5", "train.compilation_cache=5", "expected a non-empty string or null"),
    ("train.init_from=5", "train.init_from=5", "expected a non-empty string or null"),
    ("train.learning_rate=abc", "train.learning_rate='abc'", "expected a number > 0"),
    ("data.val_fraction=abc", "data.val_fraction='abc'", "expected a number in [0, 1)"),
    # 4. values that used to be accepted
    ("train.eps=-1", "train.eps=-1", "expected a number > 0"),
    ("train.learning_rate=.inf", "train.learning_rate=inf", "expected a number > 0"),
    ("train.learning_rate=.nan", "train.learning_rate=nan", "expected a number > 0"),
    ("train.b1=.nan", "train.b1=nan", "expected a number in [0, 1)"),
    ("data.val_fraction=.nan", "data.val_fraction=nan", "expected a number in [0, 1)"),
    ("train.peak_flops=.inf", "train.peak_flops=inf", "expected a number > 0 or null"),
    ("options.init_std=.nan", "options.init_std=nan", "expected a number > 0"),
    ("model.rms_norm_eps=.nan", "'rms_norm_eps'=nan", "expected a finite number"),
    ("model.rope_theta=.inf", "'rope_theta'=inf", "expected a finite number"),
    ("model.eos_token_id=512", "'eos_token_id'=512", "[0, vocab_size=512)"),
    ("model.bos_token_id=-1", "'bos_token_id'=-1", "[0, vocab_size=512)"),
    ("model.pad_token_id=600", "'pad_token_id'=600", "[0, vocab_size=512)"),
    ("train.tensorboard=maybe", "train.tensorboard='maybe'", "expected true or false"),
    ("train.async_checkpointing=1", "train.async_checkpointing=1", "expected true or false"),
    ("train.steps=1.5", "train.steps=1.5", "expected an integer >= 1"),
    ("train.steps=100.0", "train.steps=100.0", "expected an integer >= 1"),
    ("train.batch_size=true", "train.batch_size=True", "expected an integer >= 1"),
    ("train.learning_rate=true", "train.learning_rate=True", "expected a number > 0"),
    ("train.decay_points=[0.5, 1.5]", "train.decay_points=[0.5, 1.5]", "expected a list of numbers in (0, 1]"),
    ("mesh.data=0", "mesh.data=0", "expected an integer >= 1 or -1"),
    ("options.moe_group_size=1.5", "options.moe_group_size=1.5", "expected an integer >= 1"),
    ("options.scan_layers=yes please", "options.scan_layers='yes please'", "expected true or false"),
]


@pytest.mark.parametrize("override, named, expected", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_a_bad_setting_is_named(cli, capsys, tmp_path, no_training, override, named, expected):
    before = tree_digest(tmp_path)
    code, _, err = run(cli, capsys, [*train_args(tmp_path), "--set", override])
    assert_clean_error(code, err, "configs/tiny.yaml", named, expected)
    assert tree_digest(tmp_path) == before


def test_a_bad_setting_in_a_file_names_file_key_and_value(cli, capsys, tmp_path, no_training):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  vocab_size: 512\ntrain:\n  learning_rate: abc\n")
    code, _, err = run(cli, capsys, ["--config", path, *train_args(tmp_path)])
    line = assert_clean_error(code, err)
    assert line == f"error: {path}: train.learning_rate='abc': expected a number > 0"


def test_prepare_output_under_a_file(cli, capsys, tmp_path):
    _write_corpus(tmp_path / "corpus")
    (tmp_path / "afile").write_text("x")
    before = tree_digest(tmp_path)
    argv = ["prepare", "--input", tmp_path / "corpus", "--output", tmp_path / "afile" / "sub" / "data"]
    code, _, err = run(cli, capsys, [*argv, "--tokenizer", "bytes", "--no-progress"])
    assert_clean_error(code, err, str(tmp_path / "afile"), "is not a directory")
    assert tree_digest(tmp_path) == before


def test_prepare_output_in_a_read_only_directory(cli, capsys, tmp_path, monkeypatch):
    _write_corpus(tmp_path / "corpus")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root may write anywhere: pretend the permission bits apply
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    try:
        before = tree_digest(tmp_path)
        argv = ["prepare", "--input", tmp_path / "corpus", "--output", locked / "data", "--tokenizer", "bytes"]
        code, _, err = run(cli, capsys, [*argv, "--no-progress"])
        assert_clean_error(code, err, str(locked / "data"), "cannot write in", "permission denied")
        assert tree_digest(tmp_path) == before
    finally:
        locked.chmod(0o755)


def test_prepare_output_that_cannot_be_created(cli, capsys, tmp_path, monkeypatch):
    """The operating system refuses (read-only file system, quota ...) after the checks passed."""
    _write_corpus(tmp_path / "corpus")

    def refuse(target):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(data_lib, "make_staging_dir", refuse)
    before = tree_digest(tmp_path)
    argv = ["prepare", "--input", tmp_path / "corpus", "--output", tmp_path / "new" / "data", "--tokenizer", "bytes"]
    code, _, err = run(cli, capsys, [*argv, "--no-progress"])
    assert_clean_error(code, err, str(tmp_path / "new" / "data"), "cannot create it", "Read-only file system")
    assert tree_digest(tmp_path) == before  # the parent directory made for it is gone again


def _interrupt(*_a, **_k):
    raise KeyboardInterrupt


def test_ctrl_c_during_set_up(cli, capsys, tmp_path, monkeypatch):
    import deepseekmoe_jax.train as train_pkg

    monkeypatch.setattr(train_pkg, "load_run_config", _interrupt)
    code, _, err = run(cli, capsys, train_args(tmp_path))
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_ctrl_c_during_prepare_leaves_nothing(cli, capsys, tmp_path, monkeypatch):
    _write_corpus(tmp_path / "corpus")
    monkeypatch.setattr(data_lib, "_read_file", _interrupt)
    before = tree_digest(tmp_path)
    argv = ["prepare", "--input", tmp_path / "corpus", "--output", tmp_path / "out" / "data", "--tokenizer", "bytes"]
    code, _, err = run(cli, capsys, [*argv, "--no-progress"])
    assert code == 130 and err.strip() == "interrupted"
    assert tree_digest(tmp_path) == before


def test_sigint_during_set_up_of_a_real_process(repo_root, tmp_path):
    """A real Ctrl-C (SIGINT) while train.py is still importing and setting up: one line, exit 130."""
    code = (
        "import os, signal, runpy, sys\n"
        "import deepseekmoe_jax.train.settings as s\n"
        "real = s.read_config_file\n"
        "def slow(path):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(path)\n"
        "s.read_config_file = slow\n"
        f"sys.argv = ['train.py', '--run-dir', {str(tmp_path / 'run')!r}]\n"
        f"runpy.run_path({str(repo_root / 'train.py')!r}, run_name='__main__')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(repo_root), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- 5. leaks
def test_prepare_removes_stale_staging_of_its_output(cli, capsys, tmp_path):
    _write_corpus(tmp_path / "corpus")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".data.tmp-{fs._host()}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\x00" * 64)
    live = tmp_path / f".data.tmp-{fs._host()}-{os.getppid()}-def456"  # a writer still running: left alone
    live.mkdir()
    other = tmp_path / f".other.tmp-{fs._host()}-{dead.pid}-abc123"  # another output's staging: left alone
    other.mkdir()
    argv = ["prepare", "--input", tmp_path / "corpus", "--output", tmp_path / "data", "--tokenizer", "bytes"]
    code, out, err = run(cli, capsys, [*argv, "--no-progress"])
    assert code == 0, err
    assert f"removed {stale}: a staging directory of data left by an interrupted prepare" in err.splitlines()
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "data" / "dataset.json").is_file()


# ----------------------------------------------------------------------------------------------- 6. messages
def _fake_train(monkeypatch):
    """Replace the training loop by its data loading: what `--data` selects is opened and checked, nothing is
    compiled."""
    import deepseekmoe_jax.train as train_pkg
    from deepseekmoe_jax.train import inputs, loop

    seen = []

    def fake(run_config, progress=True):
        seen.append(run_config)
        inputs.data_sources(run_config, print)
        return loop.TrainResult("completed", run_config.train.run_dir, 0, None, {}, None)

    monkeypatch.setattr(train_pkg, "train", fake)
    return seen


def test_data_replaces_the_built_in_corpus(cli, capsys, tmp_path, dataset, monkeypatch):
    seen = _fake_train(monkeypatch)
    code, out, err = run(cli, capsys, train_args(tmp_path, "--data", dataset))
    assert code == 0, err
    assert seen[0].data.path == str(dataset) and seen[0].data.corpus is None
    assert any(line.startswith("data: ") and "sequences of 128" in line for line in out.splitlines()), out


def test_data_path_with_a_corpus_says_how_to_fix_it(cli, capsys, tmp_path, no_training, dataset):
    code, _, err = run(cli, capsys, ["--set", f"data.path={dataset}", *train_args(tmp_path)])
    assert_clean_error(code, err, "configs/tiny.yaml", "data.corpus='python-stdlib'", "--set data.corpus=null")


def test_validation_is_also_the_python_api(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: {vocab_size: 300, eos_token_id: 300}\n")
    with pytest.raises(ConfigError, match=r"'eos_token_id'=300: expected a token id in \[0, vocab_size=300\)"):
        load_run_config(path)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--steps", "abc"], ["python train.py: argument --steps: invalid int value: 'abc'"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
        (["prepare", "--input", "x"], ["python train.py prepare:", "--output", "--tokenizer"]),
    ],
)
def test_usage_errors_end_in_one_error_line(cli, capsys, argv, needles):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert_clean_error(exit_info.value.code, capsys.readouterr().err, *needles)
