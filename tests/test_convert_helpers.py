"""Helpers for the conversion tests (no tests here): HF checkpoint directories written the way the Hub stores
them, with the real `safetensors` / `torch.save` writers, from random-weight PyTorch reference models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from deepseekmoe_jax import DeepseekConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = ("safetensors-sharded", "safetensors", "bin-sharded", "bin")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
REMOTE_CODE = ("configuration_deepseek.py", "modeling_deepseek.py")


def hf_config(config: DeepseekConfig, torch_dtype: str) -> DeepseekConfig:
    """``config`` with the bookkeeping fields a Hub config.json carries (torch_dtype, auto_map)."""
    return config.replace(
        hf_metadata={
            "architectures": ["DeepseekForCausalLM"],
            "torch_dtype": torch_dtype,
            "auto_map": {
                "AutoConfig": "configuration_deepseek.DeepseekConfig",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
            },
        }
    )


def _split(keys: list[str], n: int) -> list[list[str]]:
    size = -(-len(keys) // n)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def write_tokenizer_files(directory: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "w0", "eos_token": "w1", "model_max_length": 64}, f)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, f)
    for name in REMOTE_CODE:
        with open(os.path.join(directory, name), "w") as f:
            f.write(f"# {name}: remote code placeholder\n")


def write_hf_checkpoint(directory: str, config: DeepseekConfig, state_dict: dict, layout: str, dtype: str) -> None:
    """Save ``state_dict`` (torch tensors, v1 keys) in one of `LAYOUTS`, plus config.json and tokenizer files."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(directory)
    tdtype = getattr(torch, dtype)
    tensors = {k: v.detach().to(tdtype).contiguous() for k, v in state_dict.items()}
    keys = list(tensors)
    if layout in ("safetensors", "bin"):
        if layout == "safetensors":
            save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    else:
        groups = _split(keys, 3)
        weight_map = {}
        for i, group in enumerate(groups):
            if layout == "safetensors-sharded":
                name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                save_file({k: tensors[k] for k in group}, os.path.join(directory, name), metadata={"format": "pt"})
            else:
                name = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
                torch.save({k: tensors[k] for k in group}, os.path.join(directory, name))
            weight_map.update(dict.fromkeys(group, name))
        index = "model.safetensors.index.json" if layout == "safetensors-sharded" else "pytorch_model.bin.index.json"
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(directory, index), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config(config, dtype).save_hf(directory)
    write_tokenizer_files(directory, config.vocab_size)


def load_hf_tensors(directory: str) -> dict:
    """Every tensor of a HF checkpoint directory as torch tensors, read with the reference libraries."""
    import torch
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
        elif name.endswith(".bin"):
            out.update(torch.load(path, weights_only=True))
    return out


def same_bits(a, b) -> bool:
    """Bit-for-bit equality of two torch tensors (dtype, shape and every byte)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(torch.equal(a.contiguous().view(view), b.contiguous().view(view)))


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "convert", *args]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # the CLI runs on the default single CPU device, as for a user
    return env


def start_cli(*args: str) -> subprocess.Popen:
    """Start ``python -m convert ARGS`` as a user would; the caller waits."""
    return subprocess.Popen(
        cli_command(*args), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def edit_config(directory: str, **changes) -> None:
    """Set fields of ``directory``'s config.json (as a user editing it by hand would)."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


def random_ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def leftovers(parent: str, name: str) -> list[str]:
    """Entries of ``parent`` that an interrupted conversion to ``parent/name`` could have left behind."""
    return sorted(e for e in os.listdir(parent) if e == name or e.startswith(f".{name}."))


def random_model(config: DeepseekConfig, seed: int = 0):
    """A `DeepseekForCausalLM` with N(0, 0.02) weights (norm weights near 1) drawn in numpy: unlike eager NNX
    initialisation, this compiles nothing, which keeps the tests fast."""
    from deepseekmoe_jax.param_store import leaf_specs, model_from_params

    rng = np.random.default_rng(seed)
    params = {}
    for path, spec in leaf_specs(config).items():
        value = rng.standard_normal(spec.shape, np.float32) * 0.02
        if any("norm" in p for p in path):
            value = 1.0 + 5 * value
        params[path] = value
    return model_from_params(config, params)


# XLA options that cut CPU compile time of the tiny test models by more than half; the numbers are unaffected
# beyond float32 rounding and the tests compare with tolerances anyway.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def model_logits(model, ids, mask=None, mesh=None) -> np.ndarray:
    """float32 logits of ``model`` for ``ids`` [B, T] (and optional attention ``mask``), jitted (inside the
    model's mesh context when ``mesh`` is given)."""
    import contextlib

    import jax
    from flax import nnx

    from deepseekmoe_jax.partitioning import rules_for, use_mesh

    graphdef, state = nnx.split(model)

    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask).logits

    ids = np.asarray(ids, np.int32)
    mask = None if mask is None else np.asarray(mask, np.int32)
    context = contextlib.nullcontext() if mesh is None else use_mesh(mesh, rules_for(model.config))
    with context:
        compiled = jax.jit(forward).lower(state, ids, mask).compile(compiler_options=FAST_COMPILE)
        return np.asarray(compiled(state, ids, mask))


def save_safetensors_sharded(directory: str, tensors) -> list[str]:
    """Write an iterable of ``(key, numpy array)`` as HF safetensors shards of at most 5 GB (+ index when more than
    one) with the package's own writer, as jax-to-hf does."""
    from deepseekmoe_jax.hf_io import (
        DEFAULT_MAX_SHARD_BYTES,
        PlannedTensor,
        SafetensorsWriter,
        plan_shards,
        shard_file_names,
        write_index,
    )

    items = list(tensors)
    plan = [PlannedTensor(k, tuple(v.shape), np.dtype(v.dtype)) for k, v in items]
    shards = plan_shards(plan, DEFAULT_MAX_SHARD_BYTES)
    names = shard_file_names(len(shards))
    values = dict(items)
    for shard, name in zip(shards, names, strict=True):
        with SafetensorsWriter(os.path.join(directory, name), shard) as w:
            for t in shard:
                w.write(t.key, values[t.key])
    if len(shards) > 1:
        write_index(directory, shards, names)
    return names
