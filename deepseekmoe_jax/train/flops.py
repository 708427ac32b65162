"""Model FLOPs per token and model FLOPs utilisation (MFU).

Formula (training = forward + backward, backward counted as twice the forward; one multiply-add = 2 FLOPs)::

    flops_per_token = 6 * N_active + 12 * L * n_heads * head_dim * seq_len

``N_active`` is the number of matmul parameters one token passes through:

* attention, every layer: q and o projections ``2 * H * n_heads * head_dim`` plus k and v projections
  ``2 * H * n_kv_heads * head_dim``;
* dense FFN layers: ``3 * H * intermediate_size`` (SwiGLU gate, up, down);
* MoE layers: the gate ``H * n_routed_experts``, the shared experts ``3 * H * moe_intermediate_size *
  n_shared_experts`` and the ``k = num_experts_per_tok`` routed experts a token is sent to,
  ``k * 3 * H * moe_intermediate_size``;
* the LM head ``H * vocab_size``.

The embedding lookup is a gather, not a matmul, and is not counted; nor are norms, softmaxes, RoPE or the MoE
dispatch/combine einsums (implementation overhead, not model FLOPs). The attention term counts ``q k^T`` and
``attn @ v`` over the full ``seq_len`` context for every position (``2 * 2 * n_heads * head_dim * seq_len`` per
token and layer in the forward pass, x3 for training), without halving for the causal mask, as in the usual MFU
convention (PaLM, Megatron). This counts routed experts at exactly ``k`` per token: tokens dropped by a finite
capacity factor are still counted, as the model (not the implementation) would compute them.
"""

from __future__ import annotations

from deepseekmoe_jax.config import DeepseekConfig

# Dense (no sparsity) peak FLOP/s of one JAX device: (bfloat16, float32). Keys are matched case-insensitively as
# substrings of `jax.Device.device_kind`, longest key first. Sources: vendor data sheets. On TPU v2/v3 a JAX
# device is one core (half a chip); from v4 on it is one chip. float32 on TPUs runs as multi-pass bfloat16, so no
# float32 peak is listed there and the bfloat16 peak is used.
PEAK_FLOPS: dict[str, tuple[float, float | None]] = {
    "b200": (2.25e15, None),
    "gh200": (989e12, 67e12),
    "h200": (989e12, 67e12),
    "h100 pcie": (756e12, 51e12),
    "h100 nvl": (835e12, 60e12),
    "h100": (989e12, 67e12),
    "h800": (989e12, 67e12),
    "a100": (312e12, 19.5e12),
    "a800": (312e12, 19.5e12),
    "l40s": (362e12, 91.6e12),
    "l4": (121e12, 30.3e12),
    "tpu v6 lite": (918e12, None),
    "tpu v6e": (918e12, None),
    "tpu v5 lite": (197e12, None),
    "tpu v5e": (197e12, None),
    "tpu v5p": (459e12, None),
    "tpu v5": (459e12, None),
    "tpu v4": (275e12, None),
    "tpu v3": (61.5e12, None),
    "tpu v2": (22.5e12, None),
}


def activated_params(config: DeepseekConfig) -> dict[str, int]:
    """Matmul parameters one token passes through, by part (see the module docstring), and their ``total``."""
    c = config
    h, d = c.hidden_size, c.head_dim
    attn = 2 * h * c.num_attention_heads * d + 2 * h * c.num_key_value_heads * d
    parts = {"attention": 0, "dense_mlp": 0, "gate": 0, "shared_experts": 0, "routed_experts": 0}
    for i in range(c.num_hidden_layers):
        parts["attention"] += attn
        if c.is_moe_layer(i):
            parts["gate"] += h * c.n_routed_experts
            parts["shared_experts"] += 3 * h * c.shared_intermediate_size
            parts["routed_experts"] += c.num_experts_per_tok * 3 * h * c.moe_intermediate_size
        else:
            parts["dense_mlp"] += 3 * h * c.intermediate_size
    parts["lm_head"] = h * c.vocab_size
    parts["total"] = sum(parts.values())
    return parts


def attention_flops_per_token(config: DeepseekConfig, seq_len: int) -> int:
    """``12 * L * n_heads * head_dim * seq_len``: scores and weighted values, forward + backward."""
    c = config
    return 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def training_flops_per_token(config: DeepseekConfig, seq_len: int) -> int:
    """Model FLOPs of one training token: ``6 * N_active + 12 * L * n_heads * head_dim * seq_len``."""
    return 6 * activated_params(config)["total"] + attention_flops_per_token(config, seq_len)


def peak_flops(device_kind: str, dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """Peak FLOP/s of one device for compute ``dtype`` and where the number came from.

    ``override`` (``train.peak_flops``) wins. Otherwise the `PEAK_FLOPS` entry matching ``device_kind``:
    its float32 column for float32 compute when listed, else the bfloat16 column. Unknown devices (CPUs among
    them) give ``(None, reason)``: MFU is then not reported.
    """
    if override is not None:
        return float(override), "train.peak_flops"
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            bf16, fp32 = PEAK_FLOPS[key]
            if dtype == "float32" and fp32 is not None:
                return fp32, f"table: {key} float32"
            return bf16, f"table: {key} bfloat16"
    return None, f"no peak FLOP/s known for device kind {device_kind!r}; set train.peak_flops to report MFU"


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over ``num_devices * peak`` (None without a peak)."""
    if peak is None or tokens_per_second <= 0:
        return None
    return flops_per_token * tokens_per_second / (num_devices * peak)
