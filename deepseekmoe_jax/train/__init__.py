"""Training: settings, data (token files and ``prepare``), optimizer and schedule, the jitted step, the loop with
checkpointing and metrics, and the model-FLOPs count. ``train.py`` at the repository root is the command line."""

from deepseekmoe_jax.train.checkpointing import CheckpointMismatch, DamagedCheckpoint
from deepseekmoe_jax.train.data import DataError, TokenDataset, prepare
from deepseekmoe_jax.train.errors import NonFiniteLoss, TrainError
from deepseekmoe_jax.train.loop import TrainResult, train
from deepseekmoe_jax.train.run_dir import RunDirLocked
from deepseekmoe_jax.train.settings import (
    DataSettings,
    MeshSettings,
    RunConfig,
    TrainSettings,
    load_run_config,
    run_config_from_dict,
)
from deepseekmoe_jax.train.signals import EXIT_TERMINATED

__all__ = [
    "EXIT_TERMINATED",
    "CheckpointMismatch",
    "DamagedCheckpoint",
    "DataError",
    "DataSettings",
    "MeshSettings",
    "NonFiniteLoss",
    "RunConfig",
    "RunDirLocked",
    "TokenDataset",
    "TrainError",
    "TrainResult",
    "TrainSettings",
    "load_run_config",
    "prepare",
    "run_config_from_dict",
    "train",
]
