"""The converter's library: DeepSeekMoE v1 checkpoints between Hugging Face (PyTorch) and JAX, streaming.

One function per ``deepseekmoe-convert`` subcommand (the command line itself is `deepseekmoe_jax.cli.convert`):
  * ``hf-to-jax HF_DIR OUT_DIR``: a HF checkpoint directory (safetensors or ``pytorch_model*.bin``, sharded or
    not) -> a JAX model directory (Orbax ``params/`` + config + tokenizer files); `convert_hf_to_jax`.
  * ``jax-to-hf CKPT_DIR OUT_DIR``: a JAX model directory or training step -> HF safetensors shards;
    `convert_jax_to_hf`.
  * ``inspect DIR``: config, parameter count, dtype and per-layer layout of either kind of directory; `describe`.
  * ``verify HF_DIR JAX_DIR``: logits of the converted model against the PyTorch reference; `verify_parity`.

Peak memory is independent of the model's depth: about 0.5 GB for deepseek-moe-16b (see docs/benchmarks.md).
"""

from deepseekmoe_jax.convert.common import ConvertError
from deepseekmoe_jax.convert.describe import describe
from deepseekmoe_jax.convert.hf_to_jax import convert_hf_to_jax
from deepseekmoe_jax.convert.jax_to_hf import convert_jax_to_hf
from deepseekmoe_jax.convert.verify import verify_parity

__all__ = ["ConvertError", "convert_hf_to_jax", "convert_jax_to_hf", "describe", "verify_parity"]
