"""The file-system helpers every writer of the project uses: overlap checks, staging, stale-staging cleanup."""

import os
import subprocess
import sys

import pytest

from deepseekmoe_jax import fs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_overlapping_input(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    assert fs.overlapping_input(corpus, [corpus]) == str(corpus)  # is an input
    assert fs.overlapping_input(tmp_path, [other, corpus]) == str(other)  # contains one
    assert fs.overlapping_input(corpus / "sub" / "out", [corpus]) == str(corpus)  # lies inside one
    assert fs.overlapping_input(tmp_path / "out", [corpus, other]) is None
    assert fs.overlapping_input(tmp_path / "corpus2", [corpus]) is None  # a shared prefix is not containment
    link = tmp_path / "link"
    link.symlink_to(corpus)
    assert fs.overlapping_input(link, [corpus]) == str(corpus)  # through a symbolic link


def test_staging_names_carry_the_writer(tmp_path):
    target = str(tmp_path / "out")
    tmp = fs.make_staging_dir(target)
    name = os.path.basename(tmp)
    assert name.startswith(".out.tmp-") and f"-{os.getpid()}-" in name
    assert fs.remove_stale_staging(target) == []  # this process is alive: its directory stays
    assert os.path.isdir(tmp)


def test_stale_staging_is_removed_and_live_is_kept(tmp_path):
    target = tmp_path / "out"
    host = fs._host()
    dead = tmp_path / f".out.tmp-{host}-{_dead_pid()}-abc123"
    legacy = tmp_path / ".out.tmp-k2j3h4"  # an older writer's name, without host and pid
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}-def456"
    foreign = tmp_path / f".out.tmp-otherhost-{_dead_pid()}-ghi789"
    unrelated = tmp_path / f".outer.tmp-{host}-{_dead_pid()}-x"
    for d in (dead, legacy, live, foreign, unrelated):
        (d / "params").mkdir(parents=True)
        (d / "params" / "chunk").write_bytes(b"x" * 100)
    removed = fs.remove_stale_staging(target)
    assert sorted(removed) == sorted([str(dead), str(legacy)])
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and foreign.exists() and unrelated.exists()


def test_interrupted_publish_is_rolled_back(tmp_path):
    """A writer killed between moving the old target aside and renaming the new one in leaves the old contents
    in ``.NAME.old-*/previous``: the next writer puts them back where they were."""
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{fs._host()}-{_dead_pid()}-zz"
    (old / "previous").mkdir(parents=True)
    (old / "previous" / "data.bin").write_bytes(b"precious")
    fs.remove_stale_staging(target)
    assert (target / "data.bin").read_bytes() == b"precious"
    assert not old.exists()


def test_publish_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    staged = fs.make_staging_dir(str(target))
    with open(os.path.join(staged, "a"), "w") as f:
        f.write("new")
    fs.publish_directory(staged, str(target))
    assert (target / "a").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_write_text_atomically_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "f.json"
    fs.write_text_atomically(path, "one")
    with pytest.raises(TypeError):
        fs.write_text_atomically(path, 5)  # not text: the write fails
    assert path.read_text() == "one" and sorted(os.listdir(tmp_path)) == ["f.json"]


def test_read_json_names_the_file_and_what_is_wrong(tmp_path):
    class Oops(ValueError):
        pass

    path = tmp_path / "meta.json"
    with pytest.raises(Oops, match=r"meta\.json: no such file; make it first"):
        fs.read_json(path, Oops, missing="make it first")
    path.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(Oops, match=r"meta\.json: not valid JSON: not UTF-8 text \(byte 0xe9 at offset 10\); redo"):
        fs.read_json(path, Oops, damaged="redo")
    path.write_text('{"a": ')
    with pytest.raises(Oops, match=r"meta\.json: not valid JSON \(Expecting value"):
        fs.read_json(path, Oops)
    path.write_text('{"a": [1, 2]}')
    assert fs.read_json(path, Oops) == {"a": [1, 2]}
