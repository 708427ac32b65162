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

from deepseekmoe_jax.checkpoint import CheckpointError, read_config
from deepseekmoe_jax.config import DeepseekConfig, ModelOptions, differing_fields
from deepseekmoe_jax.config_files import apply_overrides, read_config_file
from deepseekmoe_jax.partitioning import DEFAULT_MESH, MESH_AXES
from deepseekmoe_jax.validation import ConfigError, check_section_keys, check_settings, setting

SCHEDULES = ("step", "cosine", "constant")
BUILTIN_CORPORA = ("python-stdlib",)


def _check_fields(cls, raw: Mapping[str, Any] | None, section: str, where: str) -> dict[str, Any]:
    try:
        return check_section_keys(cls, raw, section)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


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

    run_dir: str = setting("runs/default", nonempty=True)
    steps: int = setting(1000, ge=1)
    batch_size: int = setting(8, ge=1)
    seq_len: int = setting(256, ge=1)
    grad_accum: int = setting(1, ge=1)
    learning_rate: float = setting(1e-3, gt=0)
    warmup_steps: int = setting(100, ge=0)
    schedule: str = setting("step", choices=SCHEDULES)
    decay_points: tuple[float, ...] = setting((0.8, 0.9), gt=0, le=1, note="fractions of train.steps")
    decay_factor: float = setting(0.316, gt=0, le=1)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)
    b1: float = setting(0.9, ge=0, lt=1)
    b2: float = setting(0.95, ge=0, lt=1)
    eps: float = setting(1e-8, gt=0)
    weight_decay: float = setting(0.1, ge=0)
    grad_clip: float = setting(1.0, ge=0, note="0 disables clipping")
    seed: int = setting(0, ge=0, le=2**31 - 1)
    log_every: int = setting(10, ge=1)
    eval_every: int = setting(0, ge=-1, note="0: only at the end, -1: never")
    eval_batches: int = setting(4, ge=1)
    checkpoint_every: int = setting(500, ge=1)
    keep_checkpoints: int = setting(3, ge=1)
    async_checkpointing: bool = True
    init_from: str | None = setting(None, nonempty=True, note="a model directory")
    loss_chunk_size: int = setting(1024, ge=1)
    tensorboard: bool = True
    peak_flops: float | None = setting(None, gt=0)
    compilation_cache: str | None = setting(None, nonempty=True, note="a directory")

    def __post_init__(self):
        check_settings(self, "train")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum={self.grad_accum!r}: must divide train.batch_size={self.batch_size}")

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

    path: str | None = setting(None, nonempty=True, note="a directory made by `python train.py prepare`")
    corpus: str | None = setting(None, choices=BUILTIN_CORPORA)
    val_fraction: float = setting(0.01, ge=0, lt=1)

    def __post_init__(self):
        check_settings(self, "data")
        if self.path is not None and self.corpus is not None:
            raise ConfigError(
                f"data.path={self.path!r} and data.corpus={self.corpus!r} are both set; choose one: to train on "
                "data.path, add --set data.corpus=null (or use --data DIR, or remove 'corpus' from the config file)"
            )


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """The ``mesh:`` section: sizes of the mesh axes ``data``, ``fsdp``, ``expert``, ``tensor`` (one may be -1,
    meaning all remaining devices).

    As for `sharding.mesh_from_config`: without a ``mesh:`` section the mesh is `sharding.DEFAULT_MESH` (every
    device on ``fsdp``, so parameters and optimizer state are sharded, never replicated); inside a section, a
    missing axis is 1 (see `from_section`).
    """

    data: int = setting(DEFAULT_MESH["data"], ge=1, also=(-1,), note="-1: all remaining devices")
    fsdp: int = setting(DEFAULT_MESH["fsdp"], ge=1, also=(-1,), note="-1: all remaining devices")
    expert: int = setting(DEFAULT_MESH["expert"], ge=1, also=(-1,), note="-1: all remaining devices")
    tensor: int = setting(DEFAULT_MESH["tensor"], ge=1, also=(-1,), note="-1: all remaining devices")

    def __post_init__(self):
        check_settings(self, "mesh")

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
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _mesh_settings(raw: Mapping[str, Any], where: str) -> MeshSettings:
    section = raw.get("mesh")
    if section is None:
        return MeshSettings()
    fields = _check_fields(MeshSettings, section, "mesh", where)
    try:
        return MeshSettings.from_section(fields)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def run_config_from_dict(raw: Mapping[str, Any], where: str = "config") -> RunConfig:
    """Split a raw project dict (``model``/``options``/``train``/``data``/``mesh``) into a `RunConfig`."""
    known = {"model", "options", "train", "data", "mesh"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; expected some of {sorted(known)}")
    train = _build(TrainSettings, raw, "train", where)
    data = _build(DataSettings, raw, "data", where)
    mesh = _mesh_settings(raw, where)
    if train.init_from is not None:
        model = _fine_tune_config(raw, train.init_from, where)
    else:
        model = DeepseekConfig.from_project_dict(raw, where=where)
    return RunConfig(model=model, train=train, data=data, mesh=mesh, raw=dict(raw))


def _fine_tune_config(raw: Mapping[str, Any], init_from: str, where: str) -> DeepseekConfig:
    """The model config of a fine-tuning run: the HF fields of the checkpoint in ``init_from`` (a ``model:``
    section, if present, must agree with them) and its options updated by the ``options:`` section."""
    try:
        base = read_config(init_from)
    except CheckpointError as e:
        raise ConfigError(f"{where}: train.init_from: {e}") from None
    if raw.get("model") is not None:
        given = DeepseekConfig.from_project_dict(raw, where=where).to_hf(metadata=False)
        have = base.to_hf(metadata=False)
        diff = differing_fields(given, have)
        if diff:
            details = ", ".join(f"{k}: config {mine!r} vs checkpoint {theirs!r}" for k, mine, theirs in diff)
            raise ConfigError(
                f"{where}: the 'model' section disagrees with the checkpoint in train.init_from={init_from} "
                f"({details}); drop the 'model' section to use the checkpoint's"
            )
    try:
        options = check_section_keys(ModelOptions, raw.get("options"), "options")
        return base.replace(options=options)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


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
