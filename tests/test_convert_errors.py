"""Bad inputs: each gives exit status 2 with one clear line naming the file/key and expected vs found, and leaves
no output (and no temporary directory) behind; an existing output directory is never damaged."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file, save_file
from test_convert_helpers import edit_config, finish, leftovers, random_model, start_cli, write_hf_checkpoint

from deepseekmoe_jax.checkpoint import save_checkpoint
from deepseekmoe_jax.cli.convert import main
from deepseekmoe_jax.param_store import ParamsWriter
from deepseekmoe_jax.reference import build_reference, reference_state_dict

CONFIG = small_config()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, str]:
    """One valid checkpoint per file format (sharded safetensors, single .bin) to derive broken ones from."""
    root = tmp_path_factory.mktemp("good")
    sd = reference_state_dict(build_reference(CONFIG, seed=0), CONFIG)
    out = {"safetensors": str(root / "st"), "bin": str(root / "bin")}
    write_hf_checkpoint(out["safetensors"], CONFIG, sd, "safetensors-sharded", "float32")
    write_hf_checkpoint(out["bin"], CONFIG, sd, "bin", "float32")
    return out


@pytest.fixture
def hf(good, tmp_path) -> str:
    """A fresh copy of the good sharded-safetensors checkpoint to break."""
    return shutil.copytree(good["safetensors"], str(tmp_path / "hf"))


@pytest.fixture
def hf_bin(good, tmp_path) -> str:
    return shutil.copytree(good["bin"], str(tmp_path / "hf"))


def convert_fails(capsys, hf_dir: str, *extra: str, status: int = 2) -> str:
    """Run hf-to-jax into a sibling ``out`` directory; assert the exit status, a one-line message and that
    nothing was left behind. Returns the message."""
    parent = os.path.dirname(hf_dir)
    out = os.path.join(parent, "out")
    existed = os.path.exists(out)
    assert main(["hf-to-jax", hf_dir, out, "--no-progress", *extra]) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    if not existed:
        assert leftovers(parent, "out") == []
    else:
        assert [e for e in leftovers(parent, "out") if e != "out"] == []
    return lines[0]


def shard(hf_dir: str, k: int) -> str:
    return os.path.join(hf_dir, f"model-{k:05d}-of-00003.safetensors")


def index_of(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        return json.load(f)


def write_index(hf_dir: str, index: dict) -> None:
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def rewrite_header(path: str, edit) -> None:
    """Apply ``edit(header dict)`` to a safetensors file's JSON header, keeping the data bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def edit_shard(hf_dir: str, k: int, edit) -> None:
    tensors = load_file(shard(hf_dir, k))
    edit(tensors)
    save_file(tensors, shard(hf_dir, k), metadata={"format": "pt"})


def key_in_shard(hf_dir: str, k: int, pattern: str = "") -> str:
    return next(
        key
        for key, f in index_of(hf_dir)["weight_map"].items()
        if f.endswith(f"{k:05d}-of-00003.safetensors") and pattern in key
    )


# ----------------------------------------------------------------------------------------------- damaged files
def test_truncated_safetensors_shard(hf, capsys):
    path = shard(hf, 2)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    msg = convert_fails(capsys, hf)
    assert "model-00002-of-00003.safetensors" in msg and "truncated" in msg and "re-download" in msg


def test_header_length_beyond_file(hf, capsys):
    with open(shard(hf, 1), "r+b") as f:
        f.write(struct.pack("<Q", 10**9))
    msg = convert_fails(capsys, hf)
    assert "model-00001-of-00003.safetensors" in msg and "header length" in msg


def test_header_lies_about_a_tensor_size(hf, capsys):
    key = key_in_shard(hf, 2)

    def grow(header):
        header[key]["data_offsets"][1] += 4

    rewrite_header(shard(hf, 2), grow)
    msg = convert_fails(capsys, hf)
    assert key in msg and "data_offsets" in msg and "corrupt" in msg


def test_header_offsets_overlap(hf, capsys):
    path = shard(hf, 3)
    weight_map = index_of(hf)["weight_map"]
    a, b = [k for k in weight_map if weight_map[k].startswith("model-00003") and "experts" in k][:2]

    def overlap(header):
        # Same-sized neighbours: point b at a's bytes, so two tensors share data and one range is left empty.
        size_a = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
        size_b = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
        assert size_a == size_b
        header[b]["data_offsets"] = list(header[a]["data_offsets"])

    rewrite_header(path, overlap)
    msg = convert_fails(capsys, hf)
    assert "model-00003-of-00003.safetensors" in msg and ("overlaps" in msg or "gap" in msg) and "corrupt" in msg


def test_header_lists_a_tensor_twice(hf, capsys):
    path = shard(hf, 1)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n).decode()
        data = f.read()
    key = key_in_shard(hf, 1, "layers.0")
    entry = json.dumps({key: json.loads(raw)[key]})[1:-1]  # '"key": {...}', prepended to the original entries
    raw = "{" + entry + "," + raw[1:]
    raw += " " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw.encode() + data)
    msg = convert_fails(capsys, hf)
    assert key in msg and "twice" in msg


def test_header_not_json(hf, capsys):
    with open(shard(hf, 1), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    msg = convert_fails(capsys, hf)
    assert "model-00001-of-00003.safetensors" in msg and "not valid JSON" in msg


def test_truncated_bin(hf_bin, capsys):
    path = os.path.join(hf_bin, "pytorch_model.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    msg = convert_fails(capsys, hf_bin)
    assert "pytorch_model.bin" in msg and "cannot read" in msg and "re-download" in msg


# ----------------------------------------------------------------------------------------------- config vs tensors
def test_config_hidden_size_disagrees(hf, capsys):
    edit_config(hf, hidden_size=64)
    msg = convert_fails(capsys, hf)
    assert "model.embed_tokens.weight" in msg and "(96, 32)" in msg and "(96, 64)" in msg
    assert "hidden_size=64" in msg and "config.json" in msg


def test_config_expert_count_disagrees(hf, capsys):
    edit_config(hf, n_routed_experts=16)
    msg = convert_fails(capsys, hf)
    assert "mlp.gate.weight" in msg and "(8, 32)" in msg and "(16, 32)" in msg and "n_routed_experts=16" in msg


def test_config_has_fewer_layers(hf, capsys):
    edit_config(hf, num_hidden_layers=3)
    msg = convert_fails(capsys, hf)
    assert "model.layers.3." in msg and "num_hidden_layers=3" in msg and "does not account for" in msg


def test_config_has_more_experts_per_layer_shared(hf, capsys):
    edit_config(hf, n_shared_experts=None)
    msg = convert_fails(capsys, hf)
    assert "shared_experts" in msg and "n_shared_experts=null" in msg


def test_config_unknown_field(hf, capsys):
    edit_config(hf, q_lora_rank=1536)
    msg = convert_fails(capsys, hf)
    assert "config.json" in msg and "q_lora_rank" in msg


def test_config_not_json(hf, capsys):
    with open(os.path.join(hf, "config.json"), "w") as f:
        f.write("{not json")
    msg = convert_fails(capsys, hf)
    assert "config.json" in msg and "not valid JSON" in msg


def test_config_missing(hf, capsys):
    os.remove(os.path.join(hf, "config.json"))
    msg = convert_fails(capsys, hf)
    assert "config.json" in msg and "missing" in msg


# ----------------------------------------------------------------------------------------------- keys and shapes
def test_missing_key(hf, capsys):
    key = key_in_shard(hf, 2, "mlp.experts.")
    shape = tuple(load_file(shard(hf, 2))[key].shape)
    edit_shard(hf, 2, lambda t: t.pop(key))
    index = index_of(hf)
    del index["weight_map"][key]
    write_index(hf, index)
    msg = convert_fails(capsys, hf)
    # Names the key, the expected shape and where it was looked for (the index and its shards).
    assert key in msg and "missing" in msg and f"shape {shape}" in msg
    assert msg.startswith(f"error: {os.path.join(hf, 'model.safetensors.index.json')} (and its 3 shard(s))")


def test_missing_key_single_file(hf_bin, capsys):
    path = os.path.join(hf_bin, "pytorch_model.bin")
    sd = torch.load(path, weights_only=True)
    key = "model.layers.2.self_attn.o_proj.weight"
    shape = tuple(sd.pop(key).shape)
    torch.save(sd, path)
    msg = convert_fails(capsys, hf_bin)
    assert msg.startswith(f"error: {path}: ") and key in msg and "missing" in msg and f"shape {shape}" in msg


def test_unexpected_key(hf, capsys):
    extra = "model.layers.1.mlp.experts.8.up_proj.weight"
    edit_shard(hf, 1, lambda t: t.__setitem__(extra, torch.zeros(16, 32)))
    index = index_of(hf)
    index["weight_map"][extra] = "model-00001-of-00003.safetensors"
    write_index(hf, index)
    msg = convert_fails(capsys, hf)
    assert extra in msg and "does not account for" in msg and "n_routed_experts=8" in msg


def test_rotary_inv_freq_is_ignored(hf, tmp_path, capsys):
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    edit_shard(hf, 1, lambda t: t.__setitem__(key, torch.ones(4)))
    index = index_of(hf)
    index["weight_map"][key] = "model-00001-of-00003.safetensors"
    write_index(hf, index)
    assert main(["hf-to-jax", hf, str(tmp_path / "ok"), "--no-progress"]) == 0
    assert "ignored 1 rotary buffer" in capsys.readouterr().err


def test_wrong_shape(hf, capsys):
    key = key_in_shard(hf, 3, "mlp.experts.")
    expected = tuple(load_file(shard(hf, 3))[key].shape)
    edit_shard(hf, 3, lambda t: t.__setitem__(key, t[key].T.contiguous()))
    found = expected[::-1]
    assert found != expected
    msg = convert_fails(capsys, hf)
    assert "model-00003-of-00003.safetensors" in msg and key in msg
    assert f"has shape {found}" in msg and f"implies {expected}" in msg


@pytest.mark.parametrize("dtype,code", [(torch.int8, "I8"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_unreadable_dtype(hf, capsys, dtype, code):
    key = key_in_shard(hf, 2, "mlp.experts.")
    edit_shard(hf, 2, lambda t: t.__setitem__(key, t[key].to(dtype)))
    msg = convert_fails(capsys, hf)
    assert "model-00002-of-00003.safetensors" in msg and key in msg
    assert f"dtype {code}" in msg and "dequantized" in msg


def test_unreadable_dtype_in_bin(hf_bin, capsys):
    path = os.path.join(hf_bin, "pytorch_model.bin")
    sd = torch.load(path, weights_only=True)
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    sd[key] = sd[key].to(torch.int8)
    torch.save(sd, path)
    msg = convert_fails(capsys, hf_bin)
    assert msg.startswith(f"error: {path}: ") and key in msg and "dtype int8" in msg and "dequantized" in msg


# ----------------------------------------------------------------------------------------------- index problems
def test_index_names_a_missing_shard(hf, capsys):
    os.remove(shard(hf, 3))
    msg = convert_fails(capsys, hf)
    assert "model-00003-of-00003.safetensors" in msg and "does not exist" in msg and "incomplete" in msg


def test_index_lists_a_key_the_shard_lacks(hf, capsys):
    index = index_of(hf)
    index["weight_map"]["model.layers.2.mlp.experts.1.up_proj.weight_extra"] = "model-00002-of-00003.safetensors"
    write_index(hf, index)
    msg = convert_fails(capsys, hf)
    assert "weight_extra" in msg and "does not" in msg


def test_shard_holds_a_key_the_index_omits(hf, capsys):
    index = index_of(hf)
    key = key_in_shard(hf, 1)
    del index["weight_map"][key]
    write_index(hf, index)
    msg = convert_fails(capsys, hf)
    assert key in msg and "does not list it" in msg


def test_no_weights(hf, capsys):
    for name in os.listdir(hf):
        if "safetensors" in name:
            os.remove(os.path.join(hf, name))
    msg = convert_fails(capsys, hf)
    assert "no weights found" in msg and "model.safetensors" in msg


# ----------------------------------------------------------------------------------------------- output handling
def test_existing_output_is_kept_without_overwrite(hf, capsys):
    out = os.path.join(os.path.dirname(hf), "out")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("mine")
    msg = convert_fails(capsys, hf)
    assert "already exists" in msg and "--overwrite" in msg
    assert os.listdir(out) == ["keep.txt"]


def test_failed_overwrite_keeps_the_old_output(hf, capsys):
    out = os.path.join(os.path.dirname(hf), "out")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("mine")
    edit_config(hf, hidden_size=64)
    convert_fails(capsys, hf, "--overwrite")
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("restore_fails", [False, True])
def test_failed_final_rename_keeps_the_old_output(hf, capsys, monkeypatch, restore_fails):
    """The conversion succeeds but publishing it (renaming the staging directory to OUT_DIR, after the old OUT_DIR
    was moved aside) fails: the old OUT_DIR is moved back, and no staging directory remains. If even moving it
    back fails, the message says where the old contents are."""
    parent = os.path.dirname(hf)
    out = os.path.join(parent, "out")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("mine")
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst, *args, **kwargs):
        src, dst = os.fspath(src), os.fspath(dst)
        if dst == out:
            calls.append(src)
            if os.path.basename(src).startswith(".out.tmp-") or restore_fails:
                raise OSError(5, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", flaky_replace)
    assert main(["hf-to-jax", hf, out, "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    # The publishing rename, then the attempt to move the old output back.
    assert [os.path.basename(c).split("-")[0] for c in calls] == [".out.tmp", "previous"]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Input/output error" in lines[0], err
    if not restore_fails:
        with open(os.path.join(out, "keep.txt")) as f:
            assert f.read() == "mine"
        assert os.listdir(out) == ["keep.txt"] and leftovers(parent, "out") == ["out"]
    else:
        (kept,) = [e for e in leftovers(parent, "out") if e.startswith(".out.old-")]
        previous = os.path.join(parent, kept, "previous")
        assert f"kept in {previous}" in lines[0]
        assert os.listdir(previous) == ["keep.txt"] and leftovers(parent, "out") == [kept]


def test_overwrite_replaces_the_old_output(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(["hf-to-jax", hf, str(out), "--overwrite", "--no-progress"]) == 0
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()
    assert leftovers(str(tmp_path), "out") == ["out"]


def test_output_may_not_replace_the_input(hf, capsys):
    before = sorted(os.listdir(hf))
    assert main(["hf-to-jax", hf, hf, "--overwrite", "--no-progress"]) == 2
    assert "the output is the input" in capsys.readouterr().err
    assert sorted(os.listdir(hf)) == before


@pytest.mark.parametrize("exc,status", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_failure_while_writing_leaves_nothing(hf, capsys, monkeypatch, exc, status):
    calls = {"n": 0}
    original = ParamsWriter.write

    def failing_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise exc
        return original(self, *args)

    monkeypatch.setattr(ParamsWriter, "write", failing_write)
    parent = os.path.dirname(hf)
    assert main(["hf-to-jax", hf, os.path.join(parent, "out"), "--no-progress"]) == status
    err = capsys.readouterr().err
    assert ("No space left" in err) if status == 2 else ("interrupted" in err)
    assert calls["n"] == 20 and leftovers(parent, "out") == []


def test_cli_subprocess_reports_one_line_without_traceback(hf):
    path = shard(hf, 1)
    with open(path, "r+b") as f:
        f.truncate(100)
    rc, out, err = finish(start_cli("hf-to-jax", hf, os.path.join(os.path.dirname(hf), "out"), "--no-progress"))
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "model-00001-of-00003.safetensors" in line
    ]
    assert leftovers(os.path.dirname(hf), "out") == []


def test_bad_dtype_argument(hf, capsys):
    with pytest.raises(SystemExit) as e:
        main(["hf-to-jax", hf, os.path.join(os.path.dirname(hf), "out"), "--dtype", "int8"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ jax-to-hf, inspect, verify
@pytest.fixture(scope="module")
def jax_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("jaxsrc") / "model")
    save_checkpoint(random_model(CONFIG, seed=1), path)
    return path


def test_jax_to_hf_needs_a_checkpoint(tmp_path, capsys):
    assert main(["jax-to-hf", str(tmp_path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no params/ directory" in err and leftovers(str(tmp_path), "out") == []


def test_jax_to_hf_config_disagrees_with_params(jax_dir, tmp_path, capsys):
    broken = shutil.copytree(jax_dir, str(tmp_path / "model"))
    edit_config(broken, moe_intermediate_size=24)
    assert main(["jax-to-hf", broken, str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "experts.w_down" in err or "experts.w_gate" in err
    assert "has shape" in err and "config.json implies" in err and leftovers(str(tmp_path), "out") == []


def test_jax_to_hf_existing_output(jax_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["jax-to-hf", jax_dir, str(tmp_path / "out"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == []


def test_jax_to_hf_bad_shard_size(jax_dir, tmp_path, capsys):
    assert main(["jax-to-hf", jax_dir, str(tmp_path / "out"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err and leftovers(str(tmp_path), "out") == []


def test_inspect_bad_directory(tmp_path, hf, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    edit_config(hf, hidden_size=64)
    assert main(["inspect", hf]) == 2
    assert "hidden_size=64" in capsys.readouterr().err


def test_verify_refuses_different_models(hf, jax_dir, capsys):
    edit_config(hf, rope_theta=500000.0)
    assert main(["verify", hf, jax_dir]) == 2
    assert "rope_theta" in capsys.readouterr().err


def test_jax_to_hf_missing_chunk_file(hf, tmp_path, capsys):
    """A converted directory missing one chunk file (a partial copy) is refused, not exported with zeros."""
    broken = str(tmp_path / "model")
    assert main(["hf-to-jax", hf, broken, "--no-progress"]) == 0
    name = "model.segments.1.layers.0.mlp.experts.w_up"
    array_dir = os.path.join(broken, "params", name)
    lost = sorted(f for f in os.listdir(array_dir) if not f.startswith("."))[-1]
    os.remove(os.path.join(array_dir, lost))
    for command in (["jax-to-hf", broken, str(tmp_path / "out"), "--no-progress"], ["inspect", broken]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{name} is missing its chunk file {lost}" in err, err
    assert leftovers(str(tmp_path), "out") == []


# ----------------------------------------------------------------------------------------------- malformed metadata
def test_index_not_utf8(hf, capsys):
    with open(os.path.join(hf, "model.safetensors.index.json"), "wb") as f:
        f.write(b'{"weight_map": {"\xff\xfe": 1}}')
    msg = convert_fails(capsys, hf)
    assert "model.safetensors.index.json" in msg and "UTF-8" in msg and "re-download" in msg


@pytest.mark.parametrize("bad", [["F32"], 4, None])
def test_header_dtype_not_a_string(hf, capsys, bad):
    key = key_in_shard(hf, 2)

    def edit(header):
        header[key]["dtype"] = bad

    rewrite_header(shard(hf, 2), edit)
    msg = convert_fails(capsys, hf)
    assert "model-00002-of-00003.safetensors" in msg and repr(key) in msg and "invalid dtype" in msg


@pytest.mark.parametrize("size", ["inf", "1e400GB", "nan", "-inf", "0.4B", "0", "-5MB"])
def test_jax_to_hf_unusable_shard_size(jax_dir, tmp_path, capsys, size):
    assert main(["jax-to-hf", jax_dir, str(tmp_path / "out"), f"--max-shard-size={size}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--max-shard-size" in lines[0] and repr(size) in lines[0], err
    assert "Traceback" not in err and leftovers(str(tmp_path), "out") == []


@pytest.mark.parametrize("flag", ["--batches", "--batch-size", "--seq-len"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_verify_rejects_empty_comparisons(hf, jax_dir, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["verify", hf, jax_dir, flag, value])
    err = capsys.readouterr()
    assert e.value.code == 2 and flag in err.err and "at least 1" in err.err and "PASS" not in err.out
