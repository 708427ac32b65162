"""Model configuration.

`DeepseekConfig` mirrors the Hugging Face ``config.json`` of ``model_type: "deepseek"`` field for field, with the
same names and class defaults, so that a checkpoint's own config file is the source of truth. Everything that is
particular to this JAX implementation (dtypes, MoE dispatch settings, attention kernel, rematerialisation) lives in
a separate `ModelOptions` object attached as ``config.options``; it is never written into ``config.json``.

Reading project config files (YAML/JSON, overrides) lives in `deepseekmoe_jax.config_files`, the declarative
settings checks and `ConfigError` in `deepseekmoe_jax.validation`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from deepseekmoe_jax.config_files import apply_overrides, read_config_file
from deepseekmoe_jax.fs import read_json, write_text_atomically
from deepseekmoe_jax.validation import (
    ConfigError,
    check_settings,
    setting,
)

# Keys that HF writes into config.json as bookkeeping. They do not change the computation; they are kept verbatim
# so that `to_hf()` reproduces the file.
_HF_METADATA_KEYS = (
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
)

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_moe_outputs")
MOE_DISPATCHES = ("auto", "capacity", "dropless", "gather")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Project-only knobs. None of these exist in the HF config; all have defaults that reproduce the reference.

    Attributes:
      param_dtype: storage dtype of the parameters ("float32" for training master weights, "bfloat16" for
        inference of large checkpoints).
      dtype: compute dtype of matmuls and activations. RMSNorm statistics, the gate softmax, attention softmax and
        the final logits are always float32 whatever this says.
      moe_group_size: tokens per dispatch group. Each sequence is cut into chunks of this many tokens; capacity is
        allotted per chunk. Smaller groups make the dispatch einsum cheaper, larger groups smooth out load.
      capacity_factor_train: expert capacity in training, as a multiple of the even share
        ``group * k / n_routed_experts``. ``None`` means no-drop (exact) mode. The default 1.5 was chosen by
        measurement (bench/capacity_factor.py, docs/benchmarks.md): it drops about half as many assignments as
        1.25 once the router is balanced, for about 10% more step time, with no measurable loss difference.
      capacity_factor_eval: the same for evaluation and inference. ``None`` (default) is the exact no-drop mode,
        which is what the PyTorch reference computes.
      min_capacity: lower bound on the per-group slot count per expert.
      moe_dispatch: how routed tokens reach their experts (`deepseekmoe_jax.moe`). "capacity": the
        capacity-bucketed one-hot einsum over groups of ``moe_group_size`` tokens (drops assignments beyond the
        capacity; with a null capacity factor every expert gets a slot for every token of a group: exact but E/k
        times the routed work). "dropless": exact; the assignments are sorted by expert into buckets whose size
        is picked at run time from a short ladder of compiled sizes. "gather": exact; gathers the chosen
        experts' weights per (token, choice), for decode-sized inputs (fewer assignments than experts).
        "auto" (default): "capacity" when the mode's capacity factor is set, otherwise "gather" when
        ``tokens * k < n_routed_experts`` and "dropless" else. The exact paths ignore the capacity factor.
      device_balance_alpha: weight of the paper's device-level balance loss (alpha2); 0 disables it.
      device_balance_groups: number of device groups D the routed experts are split into for that loss.
      attention_impl: "xla", "cudnn" (flash attention, GPU with bf16/fp16 only) or "auto" (cuDNN where it applies).
      remat_policy: rematerialisation of each scanned decoder layer in training: one of `REMAT_POLICIES`.
      scan_layers: run stacks of identical layers with `jax.lax.scan` (compile time independent of depth).
      init_std: standard deviation of the normal initialiser for fresh weights (the paper uses 0.006; the HF
        field ``initializer_range`` is kept for round-tripping but this option decides).
      logical_axis_rules: optional overrides of the logical-to-mesh axis rules, as ``((logical, mesh), ...)``.
    """

    param_dtype: str = setting("float32", choices=_DTYPES)
    dtype: str = setting("float32", choices=_DTYPES)
    moe_group_size: int = setting(512, ge=1)
    capacity_factor_train: float | None = setting(1.5, gt=0, note="null: no-drop mode")
    capacity_factor_eval: float | None = setting(None, gt=0, note="null: no-drop mode")
    min_capacity: int = setting(4, ge=1)
    moe_dispatch: str = setting("auto", choices=MOE_DISPATCHES)
    device_balance_alpha: float = setting(0.0, ge=0)
    device_balance_groups: int = setting(1, ge=1)
    attention_impl: str = setting("auto", choices=_ATTENTION_IMPLS)
    remat_policy: str = setting("none", choices=REMAT_POLICIES)
    scan_layers: bool = True
    init_std: float = setting(0.006, gt=0)
    logical_axis_rules: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self):
        check_settings(self, "options")
        if self.logical_axis_rules is not None:
            try:
                rules = tuple((str(k), _freeze_axis(v)) for k, v in _rule_items(self.logical_axis_rules))
            except (TypeError, ValueError):
                raise ConfigError(
                    f"options.logical_axis_rules={self.logical_axis_rules!r}: expected a mapping (or list of pairs) "
                    "of logical axis names to a mesh axis, a list of mesh axes or null"
                ) from None
            object.__setattr__(self, "logical_axis_rules", rules)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ModelOptions:
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"'options': expected a mapping of options, found {d!r}")
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} in 'options'; known options are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.logical_axis_rules is not None:
            d["logical_axis_rules"] = [[k, list(v) if isinstance(v, tuple) else v] for k, v in self.logical_axis_rules]
        return d


def _rule_items(rules):
    if isinstance(rules, Mapping):
        return list(rules.items())
    return [tuple(r) for r in rules]


def _freeze_axis(v):
    if isinstance(v, list | tuple):
        return tuple(v)
    return v


@dataclasses.dataclass(frozen=True, eq=True)
class DeepseekConfig:
    """The HF ``config.json`` of a DeepSeekMoE (v1, ``model_type: "deepseek"``) model.

    Field names and defaults are those of the reference ``DeepseekConfig`` class. ``n_routed_experts=None`` gives a
    dense (Llama-like) model. Use `DeepseekConfig.from_hf` to read a checkpoint's ``config.json`` (unknown fields are
    refused) and `to_hf` to write one back. Project-only settings live in ``options`` (a `ModelOptions`).
    """

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # HF bookkeeping keys found in the source config.json (architectures, auto_map, torch_dtype, ...), kept verbatim.
    hf_metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    # Project-only settings; never part of config.json.
    options: ModelOptions = dataclasses.field(default_factory=ModelOptions)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", ModelOptions.from_dict(self.options))
        self._validate()

    def __hash__(self):
        return hash(
            json.dumps(
                {"hf": self.to_hf(metadata=False), "options": self.options.to_dict()}, sort_keys=True, default=str
            )
        )

    # ------------------------------------------------------------------ validation
    _INT_FIELDS = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "moe_layer_freq",
        "first_k_dense_replace",
        "max_position_embeddings",
        "pretraining_tp",
    )
    _OPTIONAL_INT_FIELDS = (
        "n_shared_experts",
        "n_routed_experts",
        "num_experts_per_tok",
        "pad_token_id",
        "bos_token_id",
    )
    _BOOL_FIELDS = ("norm_topk_prob", "seq_aux", "use_cache", "tie_word_embeddings", "attention_bias")
    _FLOAT_FIELDS = ("aux_loss_alpha", "initializer_range", "rms_norm_eps", "rope_theta", "attention_dropout")
    _STR_FIELDS = ("scoring_func", "hidden_act")

    def _validate_types(self):
        """JSON types of the HF fields: a string "false" for a flag, or a quoted number, would otherwise be
        accepted and silently change the model (any non-empty string is true)."""

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def bad(field, expected):
            value = getattr(self, field)
            raise ConfigError(f"config field '{field}'={value!r}: expected {expected}, found a {type(value).__name__}")

        for f in self._INT_FIELDS:
            if not is_int(getattr(self, f)):
                bad(f, "an integer")
        for f in self._OPTIONAL_INT_FIELDS:
            if getattr(self, f) is not None and not is_int(getattr(self, f)):
                bad(f, "an integer or null")
        for f in self._BOOL_FIELDS:
            if not isinstance(getattr(self, f), bool):
                bad(f, "true or false")
        for f in self._FLOAT_FIELDS:
            if not (is_int(getattr(self, f)) or isinstance(getattr(self, f), float)):
                bad(f, "a number")
            if not math.isfinite(getattr(self, f)):
                raise ConfigError(f"config field '{f}'={getattr(self, f)!r}: expected a finite number")
        for f in self._STR_FIELDS:
            if not isinstance(getattr(self, f), str):
                bad(f, "a string")
        eos = self.eos_token_id
        if not (eos is None or is_int(eos) or (isinstance(eos, tuple) and all(is_int(t) for t in eos))):
            bad("eos_token_id", "an integer, a list of integers or null")

    def _validate(self):
        def need(cond, field, msg):
            if not cond:
                raise ConfigError(f"config field '{field}'={getattr(self, field)!r}: {msg}")

        self._validate_types()

        for f in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "moe_layer_freq",
        ):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "expected a positive integer")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size={self.hidden_size}",
        )
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        need(
            (self.hidden_size // self.num_attention_heads) % 2 == 0,
            "hidden_size",
            "head_dim = hidden_size / num_attention_heads must be even for rotary embeddings",
        )
        need(self.scoring_func == "softmax", "scoring_func", "only 'softmax' is defined for DeepSeekMoE v1")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(self.attention_dropout == 0.0, "attention_dropout", "attention dropout is not supported; use 0.0")
        need(
            isinstance(self.first_k_dense_replace, int) and self.first_k_dense_replace >= 0,
            "first_k_dense_replace",
            "expected an integer >= 0",
        )
        need(self.rms_norm_eps > 0, "rms_norm_eps", "expected > 0")
        need(self.rope_theta > 0, "rope_theta", "expected > 0")
        need(self.aux_loss_alpha >= 0, "aux_loss_alpha", "expected >= 0")
        need(
            isinstance(self.pretraining_tp, int) and self.pretraining_tp >= 1,
            "pretraining_tp",
            "expected an integer >= 1 (it only changes how the reference slices matmuls)",
        )
        moe_fields = (self.n_routed_experts, self.num_experts_per_tok)
        if any(v is not None for v in moe_fields):
            need(
                isinstance(self.n_routed_experts, int) and self.n_routed_experts > 0,
                "n_routed_experts",
                "expected a positive integer (or null for a dense model, together with num_experts_per_tok)",
            )
            need(
                isinstance(self.num_experts_per_tok, int) and self.num_experts_per_tok > 0,
                "num_experts_per_tok",
                "expected a positive integer when n_routed_experts is set",
            )
            need(
                self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok",
                f"cannot exceed n_routed_experts={self.n_routed_experts}",
            )
            need(
                isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                "moe_intermediate_size",
                "expected a positive integer",
            )
            need(
                self.n_shared_experts is None
                or (isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0),
                "n_shared_experts",
                "expected null or an integer >= 0",
            )
            g = self.options.device_balance_groups
            if self.n_routed_experts % g:
                raise ConfigError(
                    f"options.device_balance_groups={g} must divide n_routed_experts={self.n_routed_experts}"
                )
        self._validate_rope_scaling()

    def _validate_rope_scaling(self):
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, Mapping):
            raise ConfigError(
                f'config field \'rope_scaling\'={rs!r}: expected null or {{"type": "linear"|"dynamic", "factor": f}}'
            )
        kind = rs.get("type", rs.get("rope_type"))
        if kind not in ("linear", "dynamic"):
            raise ConfigError(
                f"config field 'rope_scaling.type'={kind!r}: DeepSeekMoE v1 defines only 'linear' and 'dynamic'"
            )
        factor = rs.get("factor")
        if not isinstance(factor, int | float) or isinstance(factor, bool) or not 1.0 <= factor < math.inf:
            raise ConfigError(f"config field 'rope_scaling.factor'={factor!r}: expected a number >= 1")
        extra = sorted(set(rs) - {"type", "rope_type", "factor"})
        if extra:
            raise ConfigError(
                f"config field 'rope_scaling' has unknown key(s) {extra}; only 'type' and 'factor' "
                "are defined for DeepSeekMoE v1"
            )

    TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

    def check_token_ids(self, fields: tuple[str, ...] = TOKEN_ID_FIELDS) -> None:
        """Raise `ConfigError` unless each of the token ids ``fields`` is null or in ``[0, vocab_size)``.

        Not part of the constructor's validation: the reference class defaults (bos 100000, eos 100001) belong to
        the 102400-token vocabulary, and HF configs of smaller models often keep them, so only ids a project
        config writes out are checked (`from_project_dict`)."""
        for field in fields:
            value = getattr(self, field)
            ids = value if isinstance(value, tuple) else () if value is None else (value,)
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(
                    f"config field '{field}'={value!r}: expected a token id in [0, vocab_size={self.vocab_size}) "
                    "or null; set it to the id the tokenizer uses, or raise vocab_size"
                )

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    @property
    def rope_type(self) -> str | None:
        if self.rope_scaling is None:
            return None
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))

    @property
    def rope_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    def is_moe_layer(self, i: int) -> bool:
        """The reference rule: layer ``i`` (absolute index) is MoE iff experts exist, ``i >= first_k_dense_replace``
        and ``i % moe_layer_freq == 0``."""
        return self.n_routed_experts is not None and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def capacity_factor(self, training: bool) -> float | None:
        return self.options.capacity_factor_train if training else self.options.capacity_factor_eval

    def replace(self, **changes) -> DeepseekConfig:
        """A copy with HF fields and/or ``options`` replaced. ``options`` may be a dict of option overrides."""
        if "options" in changes and isinstance(changes["options"], Mapping):
            changes["options"] = dataclasses.replace(self.options, **changes["options"])
        return dataclasses.replace(self, **changes)

    def with_options(self, **options) -> DeepseekConfig:
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **options))

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def hf_field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("hf_metadata", "options"))

    @classmethod
    def from_hf(
        cls,
        source: str | os.PathLike | Mapping[str, Any],
        options: ModelOptions | Mapping | None = None,
        *,
        where: str = "config",
    ) -> DeepseekConfig:
        """Read a HF config: a ``config.json`` path, a checkpoint directory holding one, or the parsed dict.

        Every key must be a `DeepseekConfig` field or a known HF bookkeeping key; anything else raises
        `ConfigError` naming the key, because silently ignoring it could build a different model. ``where``
        names a parsed dict's origin in messages (a path names itself).
        """
        if not isinstance(source, Mapping):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            source = read_json(path, ConfigError, missing="a HF checkpoint directory must contain config.json")
        if not isinstance(source, Mapping):
            raise ConfigError(f"{where}: expected a JSON object of config fields, found a {type(source).__name__}")
        d = dict(source)
        model_type = d.get("model_type", "deepseek")
        if model_type != "deepseek":
            raise ConfigError(
                f"{where}: model_type={model_type!r}; this project reads DeepSeekMoE v1 "
                "checkpoints (model_type 'deepseek')"
            )
        fields = set(cls.hf_field_names())
        metadata = {k: d.pop(k) for k in list(d) if k in _HF_METADATA_KEYS}
        unknown = sorted(k for k in d if k not in fields)
        if unknown:
            raise ConfigError(
                f"{where}: unknown config field(s) {unknown}. They are not part of DeepSeekMoE v1 "
                "and this project will not guess what they mean; remove them if they have no "
                "effect on the model."
            )
        if isinstance(options, Mapping) or options is None:
            options = ModelOptions.from_dict(options)
        try:
            return cls(**d, hf_metadata=metadata, options=options)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self, metadata: bool = True) -> dict[str, Any]:
        """The ``config.json`` dict (HF field names; bookkeeping keys from the source file preserved)."""
        out: dict[str, Any] = {}
        if metadata:
            out.update(self.hf_metadata)
            out.setdefault("architectures", ["DeepseekForCausalLM"])
            out["model_type"] = "deepseek"
        for name in self.hf_field_names():
            v = getattr(self, name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[name] = v
        return out

    def save_hf(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (``path`` is the file or its directory); written aside and renamed, so a reader
        never sees a partial file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        write_text_atomically(path, json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ project config files
    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> DeepseekConfig:
        """Load a project config (``configs/*.yaml`` with ``model:`` and ``options:`` sections) or a HF config.json.

        ``overrides`` maps dotted keys (``model.hidden_size``, ``options.dtype``) to values.
        """
        raw = read_config_file(path)
        if overrides:
            raw = apply_overrides(raw, overrides)
        return cls.from_project_dict(raw, where=os.fspath(path))

    @classmethod
    def from_project_dict(cls, raw: Mapping[str, Any], where: str = "config") -> DeepseekConfig:
        """The model of a project config dict: ``model:`` (HF fields; null for the class defaults) and ``options:``.
        Token ids the ``model:`` section gives must lie inside its vocabulary (`check_token_ids`)."""
        if "model" not in raw:
            raise ConfigError(f"{where}: no 'model' section (the HF config.json fields)")
        model = raw["model"]
        if model is not None and not isinstance(model, Mapping):
            raise ConfigError(f"{where}: 'model': expected a mapping of config.json fields, found {model!r}")
        try:
            options = ModelOptions.from_dict(raw.get("options"))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: options: {e}") from None
        if model is None:
            return cls(options=options)
        config = cls.from_hf(dict(model), options=options, where=where)
        try:
            config.check_token_ids(tuple(f for f in cls.TOKEN_ID_FIELDS if f in model))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return config

    def to_project_dict(self) -> dict[str, Any]:
        return {"model": self.to_hf(), "options": self.options.to_dict()}


def differing_fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, a[key], b[key])`` for every key, sorted, whose value differs between ``a`` and ``b``; a key that one
    side lacks reads as None there. For "which config fields differ" checks, e.g. of two ``to_hf()`` dicts."""
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def format_changes(diffs: list[tuple[str, Any, Any]]) -> str:
    """`differing_fields` as ``"key: old -> new, ..."`` (values as ``repr``), for messages."""
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)


def capacity(group_size: int, k: int, n_experts: int, capacity_factor: float | None, min_capacity: int) -> int:
    """Slots per expert per group: ``ceil(group * k * cf / E)``, at least ``min_capacity``, at most ``group``.

    ``capacity_factor=None`` is the no-drop mode: every expert gets ``group`` slots, so nothing can be dropped
    (a token picks an expert at most once).
    """
    if capacity_factor is None:
        return group_size
    c = math.ceil(group_size * k * capacity_factor / n_experts)
    return max(1, min(group_size, max(c, min_capacity)))
