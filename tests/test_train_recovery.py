"""Recovery from damaged checkpoints, stop signals outside the step loop, the run-directory lock and unwritable
output paths, on the small training run of tests/test_train_loop.py (12 steps, checkpoints every 4).

One uninterrupted run is the reference. Each damage test copies it as a run interrupted after step 8 (checkpoints
4 and 8), damages the newest checkpoint in one way and resumes: training must continue from the newest intact
checkpoint, say which one it skipped, keep the damaged one (moved aside) and end bit-for-bit where the reference
ended (per-step losses, and the final checkpoint's checksums of every parameter and optimizer-state array).
"""

import copy
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
from badinput import assert_clean_error
from test_train_loop import _write_config, base_config

from deepseekmoe_jax.checkpoint import CheckpointError
from deepseekmoe_jax.tokenizer import ByteTokenizer
from deepseekmoe_jax.train import TrainError, run_config_from_dict, train
from deepseekmoe_jax.train.data import prepare
from deepseekmoe_jax.train.metrics import read_jsonl
from deepseekmoe_jax.train.placement import enable_compilation_cache
from deepseekmoe_jax.train.run_dir import RunDirLocked, RunLock

STEPS = 12
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def _config(root, run_dir, cache) -> dict:
    raw = base_config(root / "data", run_dir, cache)
    raw["train"].update(steps=STEPS, checkpoint_every=4, keep_checkpoints=3, eval_every=0, tensorboard=False)
    return raw


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(WORDS[(3 * j + i) % 8] for j in range(400)))
    prepare([str(corpus)], root / "data", ByteTokenizer(), val_fraction=0.1, progress=False)
    cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    enable_compilation_cache(cache)
    raw = _config(root, root / "ref", cache)
    result = train(run_config_from_dict(raw), progress=False, log=lambda _m: None)
    assert result.status == "completed" and result.step == STEPS
    return root, cache, raw, read_jsonl(str(root / "ref" / "metrics.jsonl"))


def _train_state(run_dir, step) -> dict:
    return json.loads((pathlib.Path(run_dir) / "checkpoints" / str(step) / "train_state" / "metadata").read_text())


def _interrupted_copy(reference, run_dir, last_step=8) -> dict:
    """The reference run as if it had been stopped right after saving ``last_step``."""
    root, cache, raw, _ = reference
    shutil.copytree(root / "ref", run_dir)
    for step in range(last_step + 4, STEPS + 1, 4):
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    metrics = run_dir / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    metrics.write_text("".join(line + "\n" for line in kept))
    cfg = copy.deepcopy(raw)
    cfg["train"]["run_dir"] = str(run_dir)
    return cfg


def _array_files(step_dir):
    return sorted(
        (p for p in pathlib.Path(step_dir, "params").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )


def _flip_a_bit_of_a_parameter(step_dir):
    """Flip one bit of one stored embedding value, rewritten through TensorStore so that every file stays well
    formed (as after a bit flip in memory or on disk below the storage format's checks): only the checksum can
    tell."""
    import numpy as np
    import tensorstore as ts

    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{step_dir}/params/", "path": "model.embed_tokens/"},
    }
    array = ts.open(spec).result()
    value = np.asarray(array[3, 5].read().result(), np.float32)
    array[3, 5].write((value.view(np.uint32) ^ np.uint32(1 << 12)).view(np.float32)).result()
    assert np.asarray(array[3, 5].read().result()) != value


def _edit_train_state(step_dir, **changes):
    path = pathlib.Path(step_dir) / "train_state" / "metadata"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


DAMAGE = {
    "deleted chunk file": lambda d: _array_files(d)[-1].unlink(),
    "truncated chunk file": lambda d: (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))(
        _array_files(d)[-1]
    ),
    "garbage metadata": lambda d: (pathlib.Path(d) / "params" / "_METADATA").write_text("{not json"),
    "flipped bit": _flip_a_bit_of_a_parameter,
    "hand-edited train_state": lambda d: _edit_train_state(d, step="abc"),
    "empty stray step directory": None,
}
REASONS = {
    "deleted chunk file": "cannot read the parameters and optimizer state: array chunk",
    "truncated chunk file": "cannot read the parameters and optimizer state: array chunk",
    "garbage metadata": "params/_METADATA (JSONDecodeError",
    "flipped bit": "params/model/embed_tokens differs from the checksum recorded when it was saved",
    "hand-edited train_state": "train_state 'step' is 'abc'",
    "empty stray step directory": "the step directory is empty",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(kind, reference, tmp_path):
    _, _, _, ref_records = reference
    run_dir = tmp_path / "run"
    cfg = _interrupted_copy(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    if DAMAGE[kind] is None:
        (ckpts / "10").mkdir()
        bad, good = 10, 8
    else:
        DAMAGE[kind](ckpts / "8")
        bad, good = 8, 4
    lines = []
    result = train(run_config_from_dict(cfg), progress=False, log=lines.append)
    text = "\n".join(lines)

    assert result.status == "completed" and result.step == STEPS, text
    assert f"resuming from {ckpts / str(good)}" in text
    skipped = [line for line in lines if line.startswith("skipped damaged checkpoint")]
    assert len(skipped) == 1, text
    assert f"{ckpts / str(bad)}: " in skipped[0] and REASONS[kind] in skipped[0], skipped[0]
    assert skipped[0].endswith(f"moved it to {run_dir / 'damaged_checkpoints' / str(bad)}")
    assert (run_dir / "damaged_checkpoints" / str(bad)).is_dir()  # kept for inspection
    # Retention (keep 3) counted only intact checkpoints: the one resumed from is still there.
    assert sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) == [4, 8, 12]
    # The same run as the reference: per-step losses and every array of the final state, bit for bit.
    want = {r["step"]: r["loss"] for r in ref_records if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "loss" in r}
    assert got == want
    assert _train_state(run_dir, STEPS) == _train_state(reference[0] / "ref", STEPS)


def test_a_save_cut_short_by_a_kill_is_removed_and_named(reference, tmp_path):
    """A save in progress when the run was killed leaves Orbax's temporary step directory (up to a whole
    checkpoint): the next run removes it, says so, and resumes from the newest complete checkpoint."""
    _, _, _, ref_records = reference
    run_dir = tmp_path / "run"
    cfg = _interrupted_copy(reference, run_dir)
    partial = run_dir / "checkpoints" / "12.orbax-checkpoint-tmp-1234567"
    shutil.copytree(run_dir / "checkpoints" / "8" / "params", partial / "params")
    lines = []
    result = train(run_config_from_dict(cfg), progress=False, log=lines.append)
    assert result.status == "completed" and result.step == STEPS
    assert any(line.startswith("removed ") and "12.orbax-checkpoint-tmp-1234567" in line for line in lines), lines
    assert not partial.exists()
    assert f"resuming from {run_dir / 'checkpoints' / '8'}" in lines
    got = {r["step"]: r["loss"] for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "loss" in r}
    assert got == {r["step"]: r["loss"] for r in ref_records if "loss" in r}


def test_every_checkpoint_damaged_is_refused(reference, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _interrupted_copy(reference, run_dir, last_step=4)
    DAMAGE["garbage metadata"](run_dir / "checkpoints" / "4")
    (run_dir / "checkpoints" / "6").mkdir()
    with pytest.raises(CheckpointError) as info:
        train(run_config_from_dict(cfg), progress=False, log=lambda _m: None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"every checkpoint in {run_dir / 'checkpoints'} is damaged")
    assert f"{run_dir / 'checkpoints' / '6'}: damaged checkpoint" in message and "steps 4 are damaged too" in message
    assert "to start this run afresh, or use another train.run_dir" in message
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["4", "6"]  # nothing moved, nothing started afresh
    assert not (run_dir / "damaged_checkpoints").exists()


def test_other_settings_are_not_reported_as_damage(reference, tmp_path):
    """A newest checkpoint that is damaged, and an intact one of another optimizer: the settings message."""
    run_dir = tmp_path / "run"
    cfg = _interrupted_copy(reference, run_dir)
    DAMAGE["garbage metadata"](run_dir / "checkpoints" / "8")
    cfg["train"]["grad_clip"] = 0.0
    with pytest.raises(
        CheckpointError,
        match=r"checkpoints/4: cannot restore the parameters and optimizer state: "
        r"they do not match this run's model or optimizer .*restore the settings",
    ):
        train(run_config_from_dict(cfg), progress=False, log=lambda _m: None)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["4", "8"]


# ----------------------------------------------------------------------------------------------- signals
_SIGTERM_IN_FINAL_EVAL = """
import os, runpy, signal, sys
from deepseekmoe_jax.train import loop

final = {{"trained": False, "sent": False}}
write, batch = loop.MetricsLogger.write, loop.global_batch

def record(self, rec):
    final["trained"] |= "loss" in rec and rec["step"] == {steps}
    write(self, rec)

def next_batch(*args, **kwargs):  # the first batch after the last step's record is the final evaluation's
    if final["trained"] and not final["sent"]:
        final["sent"] = True
        os.kill(os.getpid(), signal.SIGTERM)
    return batch(*args, **kwargs)

loop.MetricsLogger.write, loop.global_batch = record, next_batch
sys.argv = ["train.py", "--config", {config!r}, "--no-progress"]
runpy.run_path({train_py!r}, run_name="__main__")
"""


def test_sigterm_during_the_final_evaluation_and_a_rerun_without_it(reference, tmp_path, repo_root):
    _, _, _, ref_records = reference
    run_dir = tmp_path / "run"
    cfg = _interrupted_copy(reference, run_dir)
    config = tmp_path / "run.yaml"
    _write_config(cfg, config)
    script = tmp_path / "sigterm_in_final_eval.py"
    script.write_text(
        _SIGTERM_IN_FINAL_EVAL.format(steps=STEPS, config=str(config), train_py=str(repo_root / "train.py"))
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(repo_root)),
        cwd=str(repo_root),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIGTERM received after the last step: the final checkpoint and evaluation were completed" in proc.stdout
    assert "Traceback" not in proc.stderr
    final_eval = [r for r in ref_records if "eval_loss" in r and r["step"] == STEPS]
    records = read_jsonl(str(run_dir / "metrics.jsonl"))
    assert [r for r in records if "eval_loss" in r] == final_eval
    assert _train_state(run_dir, STEPS) == _train_state(reference[0] / "ref", STEPS)

    # As if killed during the final evaluation: the rerun performs it instead of only saying "complete".
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records if "eval_loss" not in r))
    lines = []
    result = train(run_config_from_dict(cfg), progress=False, log=lines.append)
    assert result.status == "already_complete" and result.eval_metrics == final_eval[0]
    assert [r for r in read_jsonl(str(metrics)) if "eval_loss" in r] == final_eval
    # Now complete, evaluation included: a second rerun does nothing.
    result = train(run_config_from_dict(cfg), progress=False, log=lines.append)
    assert result.status == "already_complete" and result.eval_metrics is None
    assert len([r for r in read_jsonl(str(metrics)) if "eval_loss" in r]) == 1


def test_a_stop_request_during_set_up_exits_cleanly(reference, tmp_path):
    """Ctrl-C while the data is opened: no traceback, no training, nothing written to checkpoints/."""
    root, cache, _, _ = reference
    cfg = _config(root, tmp_path / "run", cache)

    def log(message):
        if message.startswith("data:"):
            os.kill(os.getpid(), signal.SIGINT)  # what a first Ctrl-C delivers

    result = train(run_config_from_dict(cfg), progress=False, log=log)
    assert result.status == "terminated" and result.step == 0 and result.checkpoint is None
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- lock, paths
def test_a_locked_run_directory_is_refused(reference, tmp_path, cli, capsys):
    root, cache, _, _ = reference
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = _config(root, run_dir, cache)
    holder = RunLock(str(run_dir))
    holder.acquire()  # a second open file description: flock conflicts as with another process
    try:
        with pytest.raises(RunDirLocked, match=rf"^{run_dir} is in use by another training process \(host "):
            train(run_config_from_dict(cfg), progress=False, log=lambda _m: None)
        _write_config(cfg, tmp_path / "run.yaml")
        code = cli.main(["--config", str(tmp_path / "run.yaml"), "--no-progress"])
        err = capsys.readouterr().err
        assert_clean_error(code, err, str(run_dir), f"pid {os.getpid()} since ", "free once that process ends")
    finally:
        holder.release()
    assert not (run_dir / ".lock").exists() and not (run_dir / "checkpoints").exists()


def test_a_stale_lock_file_does_not_block(tmp_path):
    (tmp_path / ".lock").write_text("host gone pid 999999 since 2020-01-01T00:00:00\n")  # its process was killed
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} since"):
        RunLock(str(tmp_path)).acquire()
    lock.release()
    RunLock(str(tmp_path)).acquire()  # free again


def test_impossible_output_paths_are_clear_errors(reference, tmp_path):
    root, cache, _, _ = reference
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = _config(root, blocker / "run", cache)
    with pytest.raises(TrainError, match=rf"train.run_dir={blocker / 'run'}: {blocker} is a file, not a directory"):
        train(run_config_from_dict(cfg), progress=False, log=lambda _m: None)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            cfg = _config(root, ro / "run", cache)
            with pytest.raises(TrainError, match=rf"train.run_dir={ro / 'run'}: cannot create it"):
                train(run_config_from_dict(cfg), progress=False, log=lambda _m: None)
        finally:
            ro.chmod(0o755)
