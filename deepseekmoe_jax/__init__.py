"""deepseekmoe_jax: DeepSeekMoE in JAX / Flax NNX."""

from deepseekmoe_jax.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepseekmoe_jax.config import ConfigError, DeepseekConfig, ModelOptions
from deepseekmoe_jax.model import (
    CausalLMOutput,
    DeepseekForCausalLM,
    DeepseekModel,
    ModelOutput,
    layer_plan,
    locate_layer,
    param_count,
)
from deepseekmoe_jax.moe import MoEMetrics
from deepseekmoe_jax.sharding import make_mesh, mesh_from_config

__version__ = "0.1.0"

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "DeepseekConfig",
    "DeepseekForCausalLM",
    "DeepseekModel",
    "MoEMetrics",
    "ModelOptions",
    "ModelOutput",
    "layer_plan",
    "load_checkpoint",
    "locate_layer",
    "make_mesh",
    "mesh_from_config",
    "param_count",
    "save_checkpoint",
]
