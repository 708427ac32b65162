"""End-to-end conversion tests: HF checkpoints of random-weight PyTorch reference models in every v1 layout,
converted by the CLI in a subprocess (as a user runs it), loaded with `load_checkpoint` and compared with PyTorch;
round trips back to HF must reproduce every tensor bit for bit (and every tokenizer file byte for byte)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import small_config
from test_convert_helpers import (
    REMOTE_CODE,
    SIDE_FILES,
    cli_env,
    finish,
    load_hf_tensors,
    model_logits,
    random_ids,
    random_model,
    same_bits,
    save_safetensors_sharded,
    start_cli,
    write_hf_checkpoint,
)

from deepseekmoe_jax.checkpoint import load_checkpoint, save_checkpoint, write_config_files
from deepseekmoe_jax.cli.convert import main
from deepseekmoe_jax.hf_weights import to_hf_state_dict
from deepseekmoe_jax.param_store import PARAMS_DIR
from deepseekmoe_jax.reference import build_reference, load_reference_state_dict, reference_logits, reference_state_dict

# name -> (config changes, HF layout, stored dtype)
VARIANTS = {
    "moe_shared": ({}, "safetensors-sharded", "float32"),
    "no_shared": ({"n_shared_experts": None}, "safetensors", "float32"),
    "gqa_freq2": (
        {"moe_layer_freq": 2, "num_key_value_heads": 2, "num_hidden_layers": 5, "first_k_dense_replace": 1},
        "bin-sharded",
        "float32",
    ),
    "dense": ({"n_routed_experts": None, "num_experts_per_tok": None, "n_shared_experts": None}, "bin", "float32"),
    "moe_bf16": ({}, "safetensors-sharded", "bfloat16"),
}
FLOAT32_VARIANTS = [v for v, (_, _, dt) in VARIANTS.items() if dt == "float32"]
ROUND_TRIPS = ("moe_shared", "moe_bf16")
SHARD_LIMIT = 60_000  # bytes; forces the round-trip output into several shards


class Variant:
    def __init__(self, name: str, root: str, seed: int):
        changes, self.layout, self.dtype = VARIANTS[name]
        self.name = name
        self.config = small_config(**changes)
        self.reference = build_reference(self.config, seed=seed)
        self.hf_dir = os.path.join(root, f"{name}-hf")
        self.jax_dir = os.path.join(root, f"{name}-jax")
        self.back_dir = os.path.join(root, f"{name}-back")
        write_hf_checkpoint(
            self.hf_dir, self.config, reference_state_dict(self.reference, self.config), self.layout, self.dtype
        )


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Variant]:
    """Every variant written as a HF checkpoint and converted by ``hf-to-jax`` run as a user runs it (``python -m
    convert`` in a subprocess, all started together); the round-trip variants converted back by ``jax-to-hf`` into
    shards of at most `SHARD_LIMIT` bytes."""
    root = str(tmp_path_factory.mktemp("convert"))
    out = {name: Variant(name, root, seed) for seed, name in enumerate(VARIANTS)}
    procs = {name: start_cli("hf-to-jax", v.hf_dir, v.jax_dir, "--no-progress") for name, v in out.items()}
    for name, proc in procs.items():
        rc, _, err = finish(proc)
        assert rc == 0, f"hf-to-jax {name} failed:\n{err}"
        assert "Traceback" not in err and "hf-to-jax: wrote" in err
    for name in ROUND_TRIPS:
        v = out[name]
        assert main(["jax-to-hf", v.jax_dir, v.back_dir, "--max-shard-size", str(SHARD_LIMIT), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("name", FLOAT32_VARIANTS)
def test_converted_logits_match_pytorch(variants, name):
    v = variants[name]
    model = load_checkpoint(v.jax_dir)
    assert model.config.options.param_dtype == "float32"
    ids = random_ids(v.config.vocab_size, seed=3)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row exercises the attention mask path on both sides
    want = reference_logits(v.reference, ids, mask)
    got = model_logits(model, ids, mask)
    real = mask.astype(bool)  # padded positions have no defined output (fully masked attention rows)
    rel = np.max(np.abs(got - want)[real]) / np.max(np.abs(want[real]))
    assert rel <= 1e-4, f"{name}: relative logit difference {rel:.2e}"


def test_output_directory_is_self_contained(variants):
    v = variants["moe_shared"]
    names = set(os.listdir(v.jax_dir))
    assert {"config.json", "deepseekmoe_jax.json", PARAMS_DIR, *SIDE_FILES, *REMOTE_CODE} <= names
    for name in (*SIDE_FILES, *REMOTE_CODE):
        with open(os.path.join(v.hf_dir, name), "rb") as a, open(os.path.join(v.jax_dir, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(v.jax_dir, "config.json")) as f:
        hf = json.load(f)
    assert hf["model_type"] == "deepseek" and hf["n_routed_experts"] == v.config.n_routed_experts
    with open(os.path.join(v.jax_dir, "deepseekmoe_jax.json")) as f:
        meta = json.load(f)
    assert meta["param_dtype"] == "float32"
    assert meta["source"]["layout"] == "safetensors" and len(meta["source"]["files"]) == 3


def test_plain_orbax_restore_and_stacked_layout(variants):
    """params/ is a genuine Orbax checkpoint: plain StandardCheckpointer().restore (no target) reads it, and the
    expert kernels are stacked [layers, experts, in, out] with HF's per-expert [out, in] weights transposed."""
    import orbax.checkpoint as ocp

    v = variants["moe_shared"]
    restored = ocp.StandardCheckpointer().restore(os.path.join(v.jax_dir, PARAMS_DIR))
    w_gate = np.asarray(restored["model"]["segments"]["1"]["layers"]["0"]["mlp"]["experts"]["w_gate"])
    c = v.config
    assert w_gate.shape == (c.num_hidden_layers - 1, c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
    sd = reference_state_dict(v.reference, c)
    np.testing.assert_array_equal(w_gate[1, 5], sd["model.layers.2.mlp.experts.5.gate_proj.weight"].numpy().T)


def test_default_dtype_follows_torch_dtype(variants):
    model = load_checkpoint(variants["moe_bf16"].jax_dir)
    assert model.config.options.param_dtype == "bfloat16"
    w_up = model.model.segments[1].layers[0].mlp.experts.w_up[...]
    assert w_up.dtype == jnp.bfloat16
    wide = load_checkpoint(variants["moe_bf16"].jax_dir, dtype="float32")  # widened on restore, exactly
    w_up32 = wide.model.segments[1].layers[0].mlp.experts.w_up[...]
    assert w_up32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w_up32), np.asarray(w_up).astype(np.float32))


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_is_bit_exact(variants, name):
    v = variants[name]
    original = load_hf_tensors(v.hf_dir)
    back = load_hf_tensors(v.back_dir)
    assert sorted(original) == sorted(back)
    different = [k for k in original if not same_bits(original[k], back[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    shards = sorted(f for f in os.listdir(v.back_dir) if f.endswith(".safetensors"))
    assert len(shards) > 1
    for shard in shards:  # like save_pretrained's max_shard_size, the limit counts tensor bytes, not the header
        path = os.path.join(v.back_dir, shard)
        with open(path, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        assert os.path.getsize(path) - header <= SHARD_LIMIT, shard
    with open(os.path.join(v.back_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(original) and set(index["weight_map"].values()) == set(shards)
    with open(os.path.join(v.back_dir, "config.json")) as f:
        hf = json.load(f)
    assert hf["model_type"] == "deepseek" and hf["torch_dtype"] == v.dtype
    for name in (*SIDE_FILES, *REMOTE_CODE):  # carried through hf-to-jax and back unchanged
        with open(os.path.join(v.hf_dir, name), "rb") as a, open(os.path.join(v.back_dir, name), "rb") as b:
            assert a.read() == b.read(), name


def test_round_trip_loads_into_reference(variants):
    v = variants["moe_shared"]
    back = load_hf_tensors(v.back_dir)
    fresh = build_reference(v.config, seed=123)
    load_reference_state_dict(fresh, back, v.config)
    ids = random_ids(v.config.vocab_size, seed=5)
    np.testing.assert_array_equal(reference_logits(fresh, ids), reference_logits(v.reference, ids))


def test_round_trip_from_bin_layout(variants, tmp_path):
    """jax-to-hf of a model that came from sharded .bin files reproduces those tensors bit for bit."""
    v = variants["gqa_freq2"]
    out = str(tmp_path / "back")
    assert main(["jax-to-hf", v.jax_dir, out, "--no-progress"]) == 0
    original, back = load_hf_tensors(v.hf_dir), load_hf_tensors(out)
    assert sorted(original) == sorted(back)
    assert all(same_bits(original[k], back[k]) for k in original)
    assert os.listdir(out).count("model.safetensors") == 1  # everything fits in one shard: no index


def test_large_tensors_stream_in_row_blocks(variants, tmp_path, monkeypatch):
    """With tiny block and chunk sizes the embedding and LM head (an identity and a transpose in the key table)
    go through in blocks of rows, both ways, with the same result as whole-tensor conversion."""
    import orbax.checkpoint as ocp

    import deepseekmoe_jax.convert.common
    import deepseekmoe_jax.param_store

    monkeypatch.setattr(deepseekmoe_jax.convert.common, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(deepseekmoe_jax.param_store, "_CHUNK_TARGET_BYTES", 2000)
    v = variants["moe_shared"]
    blocked = str(tmp_path / "jax")
    assert main(["hf-to-jax", v.hf_dir, blocked, "--no-progress"]) == 0
    with open(os.path.join(blocked, PARAMS_DIR, "lm_head", ".zarray")) as f:
        chunks = json.load(f)["chunks"]
    assert chunks[1] < v.config.vocab_size  # several blocks of HF rows (= vocab columns of the JAX kernel)
    a = ocp.StandardCheckpointer().restore(os.path.join(blocked, PARAMS_DIR))
    b = ocp.StandardCheckpointer().restore(os.path.join(v.jax_dir, PARAMS_DIR))
    chex.assert_trees_all_equal(a, b)
    assert main(["jax-to-hf", blocked, str(tmp_path / "hf"), "--no-progress"]) == 0
    original, back = load_hf_tensors(v.hf_dir), load_hf_tensors(str(tmp_path / "hf"))
    assert sorted(original) == sorted(back) and all(same_bits(original[k], back[k]) for k in original)


def test_jax_to_hf_dtype_override(variants, tmp_path):
    v = variants["moe_bf16"]
    out = str(tmp_path / "f32")
    assert main(["jax-to-hf", v.jax_dir, out, "--dtype", "float32", "--no-progress"]) == 0
    original, back = load_hf_tensors(v.hf_dir), load_hf_tensors(out)
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], original[k].float()) for k in original)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float32"  # the dtype the tensors are stored in, not the source's


def test_config_records_the_stored_dtype(variants, tmp_path):
    """Converting a bfloat16 checkpoint to float32 (either direction) writes config.json with ``torch_dtype`` (and
    the newer ``dtype`` key where the source has it) naming float32, the dtype of the written parameters."""
    import orbax.checkpoint as ocp

    v = variants["moe_bf16"]
    src = shutil.copytree(v.hf_dir, str(tmp_path / "hf"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["torch_dtype"] == "bfloat16"
    cfg["dtype"] = "bfloat16"
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    wide = str(tmp_path / "jax32")
    assert main(["hf-to-jax", src, wide, "--dtype", "float32", "--no-progress"]) == 0
    with open(os.path.join(wide, "config.json")) as f:
        written = json.load(f)
    assert written["torch_dtype"] == "float32" and written["dtype"] == "float32"
    params = ocp.StandardCheckpointer().restore(os.path.join(wide, PARAMS_DIR))
    assert {np.dtype(x.dtype) for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    back = str(tmp_path / "back32")  # no --dtype: written as stored (float32), and config.json says so
    assert main(["jax-to-hf", wide, back, "--no-progress"]) == 0
    with open(os.path.join(back, "config.json")) as f:
        written = json.load(f)
    assert written["torch_dtype"] == "float32" and written["dtype"] == "float32"
    assert {t.dtype for t in load_hf_tensors(back).values()} == {torch.float32}
    narrow = str(tmp_path / "back16")
    assert main(["jax-to-hf", wide, narrow, "--dtype", "bfloat16", "--no-progress"]) == 0
    with open(os.path.join(narrow, "config.json")) as f:
        written = json.load(f)
    assert written["torch_dtype"] == "bfloat16" and written["dtype"] == "bfloat16"
    original = load_hf_tensors(v.hf_dir)
    assert all(same_bits(original[k], t) for k, t in load_hf_tensors(narrow).items())


def test_training_checkpoint_to_hf(tmp_path, capsys):
    """A training-run layout (RUN/config.json, RUN/checkpoints/<step>/params written by Orbax with OCDBT, the
    default) exports to exactly `to_hf_state_dict` of the model."""
    from deepseekmoe_jax.checkpoint import save_params

    config = small_config(num_key_value_heads=2)
    model = random_model(config, seed=7)
    run = tmp_path / "run"
    step = run / "checkpoints" / "40"
    step.mkdir(parents=True)
    write_config_files(str(run), config)
    save_params(model, str(step))
    assert os.path.isfile(step / PARAMS_DIR / "manifest.ocdbt")
    out = str(tmp_path / "hf")
    assert main(["jax-to-hf", str(step), out, "--no-progress"]) == 0
    back = load_hf_tensors(out)
    want = dict(to_hf_state_dict(model))
    assert sorted(back) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)
    capsys.readouterr()
    assert main(["inspect", str(step)]) == 0
    text = capsys.readouterr().out
    assert "training checkpoint step" in text and "OCDBT" in text and str(run / "config.json") in text


def test_save_checkpoint_round_trips_through_hf(tmp_path):
    """save_checkpoint (OCDBT) -> jax-to-hf -> hf-to-jax -> load_checkpoint gives the same parameters."""
    from deepseekmoe_jax.checkpoint import param_tree

    config = small_config(n_shared_experts=2)
    model = random_model(config, seed=3)
    save_checkpoint(model, str(tmp_path / "jax"))
    assert main(["jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "hf"), "--no-progress"]) == 0
    assert main(["hf-to-jax", str(tmp_path / "hf"), str(tmp_path / "jax2"), "--no-progress"]) == 0
    again = load_checkpoint(str(tmp_path / "jax2"))
    assert again.config.options.param_dtype == "float32"
    a, b = param_tree(model), param_tree(again)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    chex.assert_trees_all_equal(a, b)


def test_inspect_jax_and_hf_directories(variants, capsys):
    v = variants["gqa_freq2"]
    assert main(["inspect", v.jax_dir]) == 0
    out = capsys.readouterr().out
    params = sum(int(np.prod(t.shape)) for t in reference_state_dict(v.reference, v.config).values())
    assert f"parameters   {params:,}" in out
    assert "JAX model directory" in out and "float32" in out
    assert "2 key/value" in out and "5 layers (3 dense, 2 MoE)" in out
    assert "layers 0-1 (dense)" in out and "layer 2 (MoE)" in out and "layer 3 (dense)" in out
    assert "w_gate [8, 32, 16]" in out  # one layer's slice of the stacked expert kernel
    assert main(["inspect", v.hf_dir]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face checkpoint" in out and f"parameters   {params:,}" in out
    assert "pytorch_model.bin.index.json" in out and "experts.{j}" in out


def test_verify_passes_and_catches_a_wrong_weight(variants, tmp_path, capsys):
    v = variants["gqa_freq2"]
    assert main(["verify", v.hf_dir, v.jax_dir, "--batches", "1", "--num-layers", "3"]) == 0
    assert "PASS" in capsys.readouterr().out
    # Same checkpoint with one expert of layer 2 perturbed: the converted model no longer matches it.
    sd = {k: t.numpy().copy() for k, t in load_hf_tensors(v.hf_dir).items()}
    sd["model.layers.2.mlp.experts.3.down_proj.weight"] *= 3.0
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    save_safetensors_sharded(str(tampered), sd.items())
    v.config.save_hf(str(tampered))
    assert main(["verify", str(tampered), v.jax_dir, "--batches", "1", "--num-layers", "3"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_progress_bar_shows_bytes_and_tensors(variants, tmp_path, capsys):
    """Without --no-progress both directions draw a tqdm bar on stderr (also when stderr is not a terminal) that
    ends at the total bytes and the number of tensors of the checkpoint."""
    from tqdm import tqdm

    v = variants["no_shared"]
    tensors = load_hf_tensors(v.hf_dir)
    size = tqdm.format_sizeof(sum(t.numel() * t.element_size() for t in tensors.values()), divisor=1024) + "B"
    for command, src, dst in (("hf-to-jax", v.hf_dir, "jax"), ("jax-to-hf", str(tmp_path / "jax"), "hf")):
        assert main([command, src, str(tmp_path / dst)]) == 0
        bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith(command)]
        final = [line for line in bar if "100%" in line]
        assert final, bar
        assert f"{size}/{size}" in final[-1] and f"{len(tensors)}/{len(tensors)} tensors" in final[-1], final[-1]
        assert "B/s" in final[-1]


def test_installed_console_script(variants):
    """The ``deepseekmoe-convert`` entry point that ``pip install`` puts next to the interpreter runs the CLI."""
    script = os.path.join(os.path.dirname(sys.executable), "deepseekmoe-convert")
    if not os.path.isfile(script):
        pytest.skip(f"console script {script} not installed (pip install -e . creates it)")
    v = variants["moe_shared"]
    result = subprocess.run(
        [script, "inspect", v.jax_dir], env=cli_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    params = sum(int(np.prod(t.shape)) for t in reference_state_dict(v.reference, v.config).values())
    assert "JAX model directory" in result.stdout and f"parameters   {params:,}" in result.stdout
    assert v.jax_dir in result.stdout


def test_cli_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("hf-to-jax", "jax-to-hf", "inspect", "verify", "examples:", "deepseek-moe-16b-base"):
        assert word in out
    for command in ("hf-to-jax", "jax-to-hf", "inspect", "verify"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example" in capsys.readouterr().out


def test_legacy_bin_shards_are_held_one_at_a_time(variants, tmp_path, monkeypatch):
    """Sharded .bin files in the legacy (pre-zip, not mappable) torch.save format convert to exactly the same
    parameters as the zip format, and at most one such shard is held in memory at any time."""
    import orbax.checkpoint as ocp

    from deepseekmoe_jax import hf_io

    v = variants["gqa_freq2"]
    legacy = shutil.copytree(v.hf_dir, str(tmp_path / "hf"))
    shards = sorted(f for f in os.listdir(legacy) if f.endswith(".bin"))
    assert len(shards) == 3
    for name in shards:
        path = os.path.join(legacy, name)
        tensors = torch.load(path, weights_only=True)
        torch.save(tensors, path, _use_new_zipfile_serialization=False)

    held = []
    read = hf_io.TorchBinFile.read

    def counting_read(self, key, rows=None):
        out = read(self, key, rows)
        held.append(sum(r.loaded for r in opened[-1]._readers.values()))
        return out

    opened = []
    open_ckpt = hf_io.HFCheckpoint.open.__func__

    def recording_open(cls, directory):
        ckpt = open_ckpt(cls, directory)
        assert all(not r.mapped and not r.loaded for r in ckpt._readers.values())  # indexed, then let go
        opened.append(ckpt)
        return ckpt

    monkeypatch.setattr(hf_io.TorchBinFile, "read", counting_read)
    monkeypatch.setattr(hf_io.HFCheckpoint, "open", classmethod(recording_open))
    out = str(tmp_path / "jax")
    assert main(["hf-to-jax", legacy, out, "--no-progress"]) == 0
    assert len(held) == len(opened[0].tensors) and max(held) == 1
    a = ocp.StandardCheckpointer().restore(os.path.join(out, PARAMS_DIR))
    b = ocp.StandardCheckpointer().restore(os.path.join(v.jax_dir, PARAMS_DIR))
    chex.assert_trees_all_equal(a, b)
