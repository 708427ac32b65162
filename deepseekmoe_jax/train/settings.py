"""Training settings: the ``train:``, ``data:`` and ``mesh:`` sections of a project config file.

A project config (``configs/*.yaml``) holds the model (``model:`` + ``options:``, read by `DeepseekConfig`) and,
for training, three more sections::

    train:   optimisation, schedule, logging, checkpointing (`TrainSettings`)
    data:    where the token files are (`DataSettings`)
    mesh:    device mesh axis sizes (`MeshSettings`)

Every section is optional (defaults below); an unknown key is an error naming it. ``--set train.steps=100``
style dotted overrides are applied to the raw file before it is split into sections.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from deepseekmoe_jax.config import ConfigError, DeepseekConfig, apply_overrides, read_config_file
from deepseekmoe_jax.sharding import DEFAULT_MESH, MESH_AXES

SCHEDULES = ("step", "cosine", "constant")
BUILTIN_CORPORA = ("python-stdlib",)


def _check_fields(cls, raw: Mapping[str, Any] | None, section: str, where: str) -> dict[str, Any]:
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in '{section}'; known keys are {sorted(known)}")
    return raw


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The ``train:`` section.

    Attributes:
      run_dir: directory of the run: config files, ``checkpoints/<step>/``, ``metrics.jsonl``, ``tensorboard/``.
        Re-running with the same directory resumes from its latest checkpoint.
      steps: number of optimizer steps.
      batch_size: sequences per optimizer step (global, over all devices and micro-batches).
      seq_len: tokens per sequence (the model sees ``seq_len`` inputs and predicts ``seq_len`` targets).
      grad_accum: micro-batches per step; gradients are summed inside one jitted step (`batch_size` must be a
        multiple of it). The result equals one step on the whole batch.
      learning_rate: peak learning rate.
      warmup_steps: linear warmup length (from ``learning_rate / warmup_steps`` up to the peak).
      schedule: "step" (the paper: x ``decay_factor`` at each of ``decay_points``), "cosine" (down to
        ``min_lr_ratio * learning_rate``) or "constant" (after warmup).
      decay_points: fractions of ``steps`` where the step schedule multiplies the rate by ``decay_factor``.
      decay_factor: the step schedule's factor (the paper: 0.316).
      min_lr_ratio: final rate of the cosine schedule, as a fraction of the peak.
      b1, b2, eps: AdamW moments.
      weight_decay: decoupled weight decay; not applied to RMSNorm weights or biases.
      grad_clip: global-norm gradient clipping threshold (0 disables).
      seed: seeds the parameter initialisation, the data order and the RNG carried in the train state.
      log_every: steps between metric records (console, JSONL, TensorBoard).
      eval_every: steps between evaluations on the held-out split (0: only at the end; -1: never).
      eval_batches: micro-batches of the held-out split per evaluation.
      checkpoint_every: steps between checkpoints (the last step is always saved).
      keep_checkpoints: how many recent checkpoints to keep.
      async_checkpointing: write checkpoints in the background while training continues.
      init_from: a model directory (``deepseekmoe-convert`` output or a training step) to fine-tune from.
      loss_chunk_size: sequence positions per chunk of the cross-entropy: logits are computed for this many
        positions at a time (and recomputed in the backward pass) instead of a [batch, seq_len, vocab] array.
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``).
      peak_flops: peak FLOP/s of one device for MFU, overriding the built-in table (needed on CPU).
      compilation_cache: directory for JAX's persistent compilation cache (null: off).
    """

    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "step"
    decay_points: tuple[float, ...] = (0.8, 0.9)
    decay_factor: float = 0.316
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    init_from: str | None = None
    loss_chunk_size: int = 1024
    tensorboard: bool = True
    peak_flops: float | None = None
    compilation_cache: str | None = None

    def __post_init__(self):
        if isinstance(self.decay_points, list):
            object.__setattr__(self, "decay_points", tuple(self.decay_points))

        def need(cond, name, msg):
            if not cond:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: {msg}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "expected a positive integer")
        for name in ("keep_checkpoints", "eval_batches", "loss_chunk_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, name, "expected a positive integer")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "expected an integer >= 0")
        need(isinstance(self.eval_every, int) and self.eval_every >= -1, "eval_every", "expected an integer >= -1")
        need(self.batch_size % self.grad_accum == 0, "grad_accum", f"must divide train.batch_size={self.batch_size}")
        need(self.schedule in SCHEDULES, "schedule", f"expected one of {SCHEDULES}")
        need(all(0 < p <= 1 for p in self.decay_points), "decay_points", "expected fractions in (0, 1]")
        need(0 < self.decay_factor <= 1, "decay_factor", "expected a number in (0, 1]")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "expected a number in [0, 1]")
        need(self.learning_rate > 0, "learning_rate", "expected > 0")
        need(0 <= self.b1 < 1, "b1", "expected a number in [0, 1)")
        need(0 <= self.b2 < 1, "b2", "expected a number in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "expected >= 0")
        need(self.grad_clip >= 0, "grad_clip", "expected >= 0 (0 disables clipping)")
        need(self.peak_flops is None or self.peak_flops > 0, "peak_flops", "expected a positive number or null")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The ``data:`` section.

    Attributes:
      path: a directory written by ``python train.py prepare`` (``dataset.json`` + token files).
      corpus: instead of ``path``, a built-in corpus prepared on first use into ``<run_dir>/data`` with the
        byte-level tokenizer: "python-stdlib" (the source files of the running Python's standard library).
      val_fraction: held-out share of documents when a built-in corpus is prepared.
    """

    path: str | None = None
    corpus: str | None = None
    val_fraction: float = 0.01

    def __post_init__(self):
        if self.corpus is not None and self.corpus not in BUILTIN_CORPORA:
            raise ConfigError(f"data.corpus={self.corpus!r}: expected one of {BUILTIN_CORPORA} or null")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction!r}: expected a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """The ``mesh:`` section: sizes of the mesh axes ``data``, ``fsdp``, ``expert``, ``tensor`` (one may be -1,
    meaning all remaining devices).

    As for `sharding.mesh_from_config`: without a ``mesh:`` section the mesh is `sharding.DEFAULT_MESH` (every
    device on ``fsdp``, so parameters and optimizer state are sharded, never replicated); inside a section, a
    missing axis is 1 (see `from_section`).
    """

    data: int = DEFAULT_MESH["data"]
    fsdp: int = DEFAULT_MESH["fsdp"]
    expert: int = DEFAULT_MESH["expert"]
    tensor: int = DEFAULT_MESH["tensor"]

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> MeshSettings:
        """The settings of a ``mesh:`` section (None: no section, the default mesh)."""
        if section is None:
            return cls()
        return cls(**{axis: section.get(axis, 1) for axis in MESH_AXES})

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs: the model config plus the three training sections, and the raw dict
    they came from (written to ``<run_dir>/run_config.yaml``)."""

    model: DeepseekConfig
    train: TrainSettings
    data: DataSettings
    mesh: MeshSettings
    raw: Mapping[str, Any]

    def replace_train(self, **changes) -> RunConfig:
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))


def _build(cls, raw, section, where):
    fields = _check_fields(cls, raw.get(section), section, where)
    try:
        return cls(**fields)
    except TypeError as e:
        raise ConfigError(f"{where}: {section}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _mesh_settings(raw: Mapping[str, Any], where: str) -> MeshSettings:
    section = raw.get("mesh")
    if section is None:
        return MeshSettings()
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: mesh: expected a mapping of {list(MESH_AXES)} to sizes, got {section!r}")
    try:
        return MeshSettings.from_section(_check_fields(MeshSettings, section, "mesh", where))
    except TypeError as e:
        raise ConfigError(f"{where}: mesh: {e}") from None


def run_config_from_dict(raw: Mapping[str, Any], where: str = "config") -> RunConfig:
    """Split a raw project dict (``model``/``options``/``train``/``data``/``mesh``) into a `RunConfig`."""
    known = {"model", "options", "train", "data", "mesh"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; expected some of {sorted(known)}")
    train = _build(TrainSettings, raw, "train", where)
    if train.init_from is not None:
        model = _fine_tune_config(raw, train.init_from, where)
    else:
        model = DeepseekConfig.from_project_dict(raw, where=where)
    return RunConfig(
        model=model,
        train=train,
        data=_build(DataSettings, raw, "data", where),
        mesh=_mesh_settings(raw, where),
        raw=dict(raw),
    )


def _fine_tune_config(raw: Mapping[str, Any], init_from: str, where: str) -> DeepseekConfig:
    """The model config of a fine-tuning run: the HF fields of the checkpoint in ``init_from`` (a ``model:``
    section, if present, must agree with them) and its options updated by the ``options:`` section."""
    from deepseekmoe_jax.checkpoint import CheckpointError, read_config

    try:
        base = read_config(init_from)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    if raw.get("model") is not None:
        given = DeepseekConfig.from_project_dict(raw, where=where).to_hf(metadata=False)
        have = base.to_hf(metadata=False)
        diff = sorted(k for k in have if given.get(k) != have[k])
        if diff:
            details = ", ".join(f"{k}: config {given.get(k)!r} vs checkpoint {have[k]!r}" for k in diff)
            raise ConfigError(
                f"{where}: the 'model' section disagrees with the checkpoint in train.init_from={init_from} "
                f"({details}); drop the 'model' section to use the checkpoint's"
            )
    options = raw.get("options") or {}
    try:
        return base.replace(options=dict(options))
    except TypeError as e:
        raise ConfigError(f"{where}: options: {e}") from None


def precision_warnings(run: RunConfig) -> list[str]:
    """Warnings about the parameter dtype of a run: fine-tuning a checkpoint saved in bfloat16 (the default of a
    converted deepseek-moe-16b) keeps that dtype unless ``options.param_dtype`` says otherwise, and then the master
    weights, gradients and optimizer state are all bfloat16."""
    dtype = run.model.options.param_dtype
    asked = "param_dtype" in (run.raw.get("options") or {})
    if run.train.init_from is None or asked or dtype == "float32":
        return []
    return [
        f"the checkpoint in train.init_from={run.train.init_from} stores {dtype} parameters and the config does "
        f"not set options.param_dtype, so this run trains with {dtype} master weights, gradients and optimizer "
        f"state (updates smaller than {dtype}'s precision are lost); for float32 master weights set "
        "options.param_dtype: float32 in the config (or --set options.param_dtype=float32)"
    ]


def load_run_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a project config file and apply dotted ``overrides`` (``{"train.steps": 100}``)."""
    raw = read_config_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return run_config_from_dict(raw, where=os.fspath(path))
