"""``inspect``: what a checkpoint directory holds (config, parameter count, dtype, per-layer layout).

Reads only config files and array metadata / file headers, never tensor data, so it is instant even for 16B.
Works on a JAX model directory (``hf-to-jax`` output), a training checkpoint step (a directory holding
``params/``, with config.json up to two levels above) and a HF checkpoint directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from deepseekmoe_jax.checkpoint import METADATA_FILE, find_config_dir, read_config
from deepseekmoe_jax.config import DeepseekConfig
from deepseekmoe_jax.convert.common import ConvertError, human_bytes
from deepseekmoe_jax.convert.hf_to_jax import check_against_config, read_hf_config
from deepseekmoe_jax.hf_io import HFCheckpoint
from deepseekmoe_jax.hf_weights import KEY_TABLE
from deepseekmoe_jax.model import LayerKind, layer_kinds, layer_plan, locate_layer
from deepseekmoe_jax.param_store import PARAMS_DIR, ParamsReader

# Layer-relative parameter names in the order of the key table (attention, MLP, ...), for readable output.
_TABLE_ORDER = {rule.path.replace("/", "."): i for i, rule in enumerate(KEY_TABLE)}


def _shape(s) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def _config_lines(config: DeepseekConfig) -> list[str]:
    c = config
    kinds = layer_kinds(c)
    n_moe = sum(k == LayerKind.MOE for k in kinds)
    lines = [
        f"model        DeepSeekMoE v1: {c.num_hidden_layers} layers ({len(kinds) - n_moe} dense, {n_moe} MoE), "
        f"hidden {c.hidden_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} key/value, head_dim "
        f"{c.head_dim}), vocab {c.vocab_size}, tied embeddings {str(c.tie_word_embeddings).lower()}",
    ]
    if c.is_moe:
        shared = f"{c.n_shared_experts} shared (width {c.shared_intermediate_size})" if c.n_shared_experts else "none"
        lines.append(
            f"experts      {c.n_routed_experts} routed (top-{c.num_experts_per_tok}, width {c.moe_intermediate_size}, "
            f"norm_topk_prob {str(c.norm_topk_prob).lower()}), shared: {shared}; MoE layers: i >= "
            f"{c.first_k_dense_replace} and i % {c.moe_layer_freq} == 0; dense width {c.intermediate_size}"
        )
    else:
        lines.append(f"mlp          dense SwiGLU, width {c.intermediate_size}")
    rope = "none" if c.rope_scaling is None else f"{c.rope_type} x{c.rope_factor:g}"
    lines.append(
        f"attention    rope_theta {c.rope_theta:g}, rope scaling {rope}, max positions {c.max_position_embeddings}, "
        f"bias {str(c.attention_bias).lower()}, rms_norm_eps {c.rms_norm_eps:g}"
    )
    return lines


def _group_layers(config: DeepseekConfig, describe_layer: Callable[[int], dict[str, str]]) -> list[str]:
    """Consecutive layers with the same kind and tensor shapes share one block of output."""
    kinds = layer_kinds(config)
    blocks: list[tuple[int, int, str, dict[str, str]]] = []
    for i, kind in enumerate(kinds):
        desc = describe_layer(i)
        if blocks and blocks[-1][2] == kind and blocks[-1][3] == desc:
            first, _, _, _ = blocks[-1]
            blocks[-1] = (first, i, kind, desc)
        else:
            blocks.append((i, i, kind, desc))
    lines = []
    for first, last, kind, desc in blocks:
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        lines.append(f"  {span} ({'MoE' if kind == LayerKind.MOE else 'dense'}):")
        groups: dict[str, list[str]] = {}
        for name, shape in desc.items():
            head, _, rest = name.rpartition(".")
            if "layernorm" in name:
                head, rest = "norms", name.removesuffix(".weight")
            groups.setdefault(head, []).append(f"{rest} {shape}")
        for head, items in groups.items():
            lines.append(f"      {head:<18} " + "  ".join(items))
    return lines


def _describe_jax(path: str) -> list[str]:
    reader = ParamsReader(path)
    step_dir = os.path.dirname(reader.params_dir)
    config_dir = find_config_dir(step_dir)
    config = read_config(config_dir)
    specs = reader.check_matches(config)
    reader.check_complete()
    kind = "JAX model directory" if config_dir == step_dir else "training checkpoint step"
    count = sum(math.prod(s.shape) for s in specs.values())
    dtypes: dict[str, int] = {}
    nbytes = 0
    for p in specs:
        dt = reader.dtype(p)
        dtypes[dt.name] = dtypes.get(dt.name, 0) + math.prod(reader.shape(p))
        nbytes += math.prod(reader.shape(p)) * dt.itemsize
    lines = [f"directory    {step_dir} ({kind})", f"config       {os.path.join(config_dir, 'config.json')}"]
    lines += _config_lines(config)
    meta = os.path.join(config_dir, METADATA_FILE)
    if os.path.isfile(meta):
        o = config.options
        lines.append(
            f"options      param_dtype {o.param_dtype}, compute dtype {o.dtype}, moe_group_size {o.moe_group_size}, "
            f"capacity factor train {o.capacity_factor_train} / eval {o.capacity_factor_eval}"
        )
    lines.append(f"parameters   {count:,} ({human_bytes(nbytes)} stored)")
    lines.append("dtype        " + ", ".join(f"{k} ({v:,} parameters)" for k, v in dtypes.items()))
    lines.append(f"storage      Orbax {PARAMS_DIR}/ ({reader.layout})")
    lines.append("scan stacks  " + "; ".join(_segment_text(config)))

    def describe_layer(i: int) -> dict[str, str]:
        seg, pos, _ = locate_layer(config, i)
        prefix = ("model", "segments", str(seg), "layers", str(pos))
        names = {".".join(p[len(prefix) :]): p for p in specs if p[: len(prefix)] == prefix}
        return {n: _shape(reader.shape(names[n])[1:]) for n in sorted(names, key=lambda n: _TABLE_ORDER.get(n, 99))}

    lines.append("per layer (one layer's slice of each stacked array):")
    lines += _group_layers(config, describe_layer)
    return lines


def _segment_text(config: DeepseekConfig) -> list[str]:
    out = []
    for s, seg in enumerate(layer_plan(config)):
        last = seg.first_layer + seg.num_layers - 1
        span = f"layer {seg.first_layer}" if last == seg.first_layer else f"layers {seg.first_layer}-{last}"
        out.append(f"segment {s} = [{', '.join(seg.kinds)}] x {seg.repeats} ({span})")
    return out


def _describe_hf(path: str) -> list[str]:
    config = read_hf_config(path)
    with HFCheckpoint.open(path) as ckpt:
        targets = check_against_config(ckpt, config)
        count = sum(math.prod(ckpt.tensors[k].shape) for k in targets)
        dtypes: dict[str, int] = {}
        for k in targets:
            dtypes[ckpt.tensors[k].dtype] = dtypes.get(ckpt.tensors[k].dtype, 0) + math.prod(ckpt.tensors[k].shape)
        ignored = [k for k in ckpt.tensors if k not in targets]
        lines = [f"directory    {path} (Hugging Face checkpoint)", f"config       {os.path.join(path, 'config.json')}"]
        lines += _config_lines(config)
        lines.append(f"parameters   {count:,} ({human_bytes(ckpt.total_bytes)} in {len(ckpt.files)} file(s))")
        lines.append("dtype        " + ", ".join(f"{k} ({v:,} parameters)" for k, v in dtypes.items()))
        index = f" + {ckpt.index_file}" if ckpt.index_file else ""
        lines.append(
            f"storage      {ckpt.layout}: {', '.join(ckpt.files[:3])}{' ...' if len(ckpt.files) > 3 else ''}"
            f"{index}" + (f"; {len(ignored)} rotary buffer(s) ignored" if ignored else "")
        )
        by_layer: dict[int, dict[str, str]] = {}
        for key, target in targets.items():
            if target.layer is not None:
                name = target.rule.hf.removesuffix(".weight")  # per-expert keys as one "experts.{j}..." line
                by_layer.setdefault(target.layer, {})[name] = _shape(ckpt.tensors[key].shape)
        if config.is_moe:
            lines.append(f"per layer (torch [out, in]; {{j}} = 0..{config.n_routed_experts - 1}):")
        else:
            lines.append("per layer (torch [out, in]):")
        lines += _group_layers(config, lambda i: by_layer.get(i, {}))
    return lines


def describe(path: str) -> str:
    """A human-readable summary of the checkpoint directory ``path`` (JAX model directory, training step, or HF)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such directory")
    if os.path.isdir(os.path.join(path, PARAMS_DIR)) or os.path.basename(path) == PARAMS_DIR:
        lines = _describe_jax(path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        lines = _describe_hf(path)
    else:
        raise ConvertError(
            f"{path}: neither a JAX model directory (params/ + config.json) nor a HF checkpoint (config.json + weights)"
        )
    return "\n".join(lines)
