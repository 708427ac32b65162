"""Time one DeepSeekMoE layer, every implementation side by side, on the device this runs on.

    python bench/moe_layer.py [--device cpu|gpu] [--smoke] [--tokens N] [--decode-tokens N] [--repeats N]
                              [--budget SECONDS] [--skip NAME ...] [--json PATH]

The layer is one MoE block of ``configs/deepseekmoe-16b.yaml`` (hidden 2048, 64 routed SwiGLU experts of width
1408 plus 2 shared experts, top-6, softmax gate without top-k renormalisation) with random weights. The weights are
drawn once for this project's JAX block and copied into every PyTorch peer through the HF key table
(`deepseekmoe_jax.hf_weights.KEY_TABLE`) and `deepseekmoe_jax.reference.load_reference_state_dict`, so every row
computes the same function of the same input.

Rows (implementations):
  jax capacity cf=F: `MoEBlock` with ``moe_dispatch="capacity"`` (the capacity-bucketed einsum) at capacity factor
    F for training and evaluation alike, groups of 512 tokens; "no-drop" is capacity factor null (every expert has
    a slot for every token of a group: exact, and E/k times the routed work actually used).
  jax dropless / jax gather: ``moe_dispatch="dropless"`` (exact, tokens sorted into per-expert buckets) and
    ``"gather"`` (gathers the chosen experts' weights; decode-sized rows only, fewer tokens than experts). Rows of
    dispatch modes that the installed `ModelOptions` does not offer say so instead of a time.
  torch seed DeepseekMoE: `SeedDeepseekMoE` below, the original DeepseekMoE block's algorithm in PyTorch: in eval
    the ``moe_infer`` loop (assignments sorted by expert, one batched call per expert that got tokens, weighted
    scatter-add back); in training the token-replicating loop (each token repeated k times, each expert applied to
    its rows, weighted sum over the k choices) plus the sequence-level balance loss. fwd times the eval path,
    fwd+bwd the training path.
  transformers DeepseekV2Moe eager / grouped_mm: the ``DeepseekV2Moe`` block (greedy top-k, one group, routed
    scaling 1 = the v1 math, as `deepseekmoe_jax.reference` uses it) with ``config._experts_implementation`` set
    to "eager" (a loop over the experts that got tokens) or "grouped_mm" (tokens sorted by expert and one
    ``torch.nn.functional.grouped_mm`` per projection).

Columns: fwd ms and fwd+bwd ms are medians over ``--repeats`` timed calls after one warm-up call (JAX: compiled
once ahead of time, timed with ``block_until_ready``; PyTorch: fwd under ``torch.no_grad()``, fwd+bwd a forward
and ``.backward()`` of a fixed random cotangent into the input and all weights; on CUDA with synchronisation).
JAX fwd runs ``training=False``, fwd+bwd ``training=True`` (the balance loss included). Useful TFLOP/s counts only
the chosen and the shared experts' matmuls: ``2 * 3 * h * i * (k + n_shared)`` FLOPs per token fwd, three times
that for fwd+bwd; dispatch, gate and wasted capacity slots are not counted. "dropped" is the block's
``MoEMetrics.dropped_fraction`` of the fwd call. "diff" is ``max |y - y_ref| / max |y_ref|`` of the fwd output
against the seed algorithm's eval output (exact), a check that every row computes the same layer. "vs grouped_mm"
is the row's fwd+bwd time over that of transformers grouped_mm at the same token count.

Time budget: each row has ``--budget`` seconds for all its calls. Before each call the script predicts its time
(the previous call of the same kind; the first fwd+bwd call as three fwd calls) and stops the row's timing when the
call would end past the budget: a cell with fewer calls than asked shows the count, a cell with only the warm-up
call shows that call's time marked "(warm-up)", a cell that did not run shows "(over budget)". ``--skip NAME``
(a substring of the row name, repeatable) leaves a row out with "(skipped)".

Modes: ``--device cpu`` (default without a GPU): float32, 1024 tokens. ``--device gpu``: bfloat16 weights and
activations, 8192 tokens, JAX on its GPU backend and PyTorch on CUDA. ``--smoke`` runs the GPU mode's code path
(bfloat16, the same rows) on CPU at tiny shapes (hidden 64, 8 experts of width 32, top-2, 2 shared, 64 tokens) in
seconds: the check of the GPU mode where no GPU is present. Decode rows (``--decode-tokens``, default 1, 0 to
leave them out) time the exact implementations and "gather" at that token count.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "deepseekmoe-16b.yaml")
SMOKE_SHAPE = {"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2}
GROUP = 512
GRAD_FACTOR = 3.0  # predicted fwd+bwd time over fwd time, for the budget


# ----------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Impl:
    name: str
    kind: str  # "jax" or "torch"
    dispatch: str | None = None  # JAX moe_dispatch
    factor: float | None = None  # JAX capacity factor (None: no-drop)
    experts_impl: str | None = None  # transformers experts implementation; None for the seed module
    decode_only: bool = False
    decode: bool = False  # also timed at the decode token count
    capacity_mode: bool = False


IMPLS = (
    Impl("jax capacity cf=1.5", "jax", "capacity", 1.5, capacity_mode=True),
    Impl("jax capacity cf=1.25", "jax", "capacity", 1.25, capacity_mode=True),
    Impl("jax capacity no-drop", "jax", "capacity", None, capacity_mode=True, decode=True),
    Impl("jax dropless", "jax", "dropless", None, decode=True),
    Impl("jax gather", "jax", "gather", None, decode_only=True, decode=True),
    Impl("torch seed DeepseekMoE", "torch", decode=True),
    Impl("transformers DeepseekV2Moe eager", "torch", experts_impl="eager", decode=True),
    Impl("transformers DeepseekV2Moe grouped_mm", "torch", experts_impl="grouped_mm", decode=True),
)
BASELINE = "transformers DeepseekV2Moe grouped_mm"
RUN_ORDER = (
    "torch seed DeepseekMoE",
    BASELINE,
    "jax capacity cf=1.5",
    "jax capacity cf=1.25",
    "jax dropless",
    "jax gather",
    "jax capacity no-drop",
    "transformers DeepseekV2Moe eager",
)


def dispatch_modes() -> tuple[str, ...] | None:
    """The ``moe_dispatch`` values the installed `ModelOptions` offers; None when it has no such option."""
    from deepseekmoe_jax.config import ModelOptions

    field = ModelOptions.__dataclass_fields__.get("moe_dispatch")
    if field is None:
        return None
    check = (field.metadata or {}).get("check")  # deepseekmoe_jax.validation.setting's Check
    choices = getattr(check, "choices", None)
    return tuple(choices) if choices else ("capacity", "dropless", "gather", "auto")


# ----------------------------------------------------------------------------------------------- the seed algorithm
def seed_module_class():
    """`SeedDeepseekMoE`, defined on first use so that importing this script does not import torch."""
    import torch
    import torch.nn.functional as F

    class SwiGLU(torch.nn.Module):
        def __init__(self, h: int, width: int):
            super().__init__()
            self.gate_proj = torch.nn.Linear(h, width, bias=False)
            self.up_proj = torch.nn.Linear(h, width, bias=False)
            self.down_proj = torch.nn.Linear(width, h, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class WithAuxLoss(torch.autograd.Function):
        """Identity on the output; the backward also gives the balance loss a gradient of one."""

        @staticmethod
        def forward(ctx, y, aux):
            ctx.aux_dtype = aux.dtype
            return y

        @staticmethod
        def backward(ctx, grad):
            return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)

    class SeedDeepseekMoE(torch.nn.Module):
        """The original DeepseekMoE block, written afresh: softmax gate over ``e`` experts, greedy top-k, optional
        top-k renormalisation, the sequence-level (or token-level) balance loss in training, routed SwiGLU experts
        as separate modules (v1 checkpoint keys ``experts.{j}.gate_proj.weight``, ...) and one shared SwiGLU of
        width ``i * n_shared``. The gate runs in float32 (the original runs it in the input dtype)."""

        def __init__(self, h, i, e, k, n_shared, norm_topk_prob=False, alpha=0.001, seq_aux=True):
            super().__init__()
            self.e, self.k, self.norm_topk_prob, self.alpha, self.seq_aux = e, k, norm_topk_prob, alpha, seq_aux
            self.gate = torch.nn.Module()
            self.gate.weight = torch.nn.Parameter(torch.empty(e, h))
            self.experts = torch.nn.ModuleList(SwiGLU(h, i) for _ in range(e))
            self.shared_experts = SwiGLU(h, i * n_shared) if n_shared else None

        def route(self, x2, b, t):
            scores = F.linear(x2.float(), self.gate.weight.float()).softmax(dim=-1)  # [n, e]
            weights, choice = torch.topk(scores, self.k, dim=-1, sorted=False)  # [n, k]
            if self.k > 1 and self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            aux = None
            if self.training and self.alpha > 0:
                if self.seq_aux:
                    counts = torch.zeros(b, self.e, device=x2.device)
                    counts.scatter_add_(1, choice.view(b, -1), torch.ones(b, t * self.k, device=x2.device))
                    load = counts / (t * self.k / self.e)
                    aux = self.alpha * (load * scores.view(b, t, -1).mean(dim=1)).sum(dim=1).mean()
                else:
                    share = F.one_hot(choice.reshape(-1), self.e).float().mean(0)
                    aux = self.alpha * (scores.mean(0) * share * self.e).sum()
            return weights, choice, aux

        def forward(self, x):
            b, t, h = x.shape
            x2 = x.reshape(b * t, h)
            weights, choice, aux = self.route(x2, b, t)
            y = self.routed_train(x2, weights, choice) if self.training else self.routed_infer(x2, weights, choice)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x2)
            y = y.view(b, t, h)
            return WithAuxLoss.apply(y, aux) if aux is not None else y

        def routed_train(self, x2, weights, choice):
            """Every token repeated k times (row ``r`` = token ``r // k``, choice ``r % k``); expert j runs on the
            rows that chose it; the k outputs of a token are summed with their gate weights."""
            n, h = x2.shape
            rows_expert = choice.reshape(-1)
            xr = x2.repeat_interleave(self.k, dim=0)  # [n * k, h]
            out = xr.new_zeros(xr.shape)
            for j, expert in enumerate(self.experts):
                rows = (rows_expert == j).nonzero().squeeze(1)
                out = out.index_copy(0, rows, expert(xr.index_select(0, rows)))
            return (out.view(n, self.k, h) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)

        @torch.no_grad()
        def routed_infer(self, x2, weights, choice):
            """``moe_infer``: assignments sorted by expert; per expert that got any, one call on its tokens, scaled
            by their gate weights and added back into the tokens' rows."""
            flat_expert = choice.reshape(-1)
            flat_weight = weights.reshape(-1, 1)
            order = flat_expert.argsort()
            ends = flat_expert.bincount(minlength=self.e).cumsum(0).tolist()  # one host sync, as the original
            y = torch.zeros_like(x2)
            start = 0
            for j, end in enumerate(ends):
                if end > start:
                    assignments = order[start:end]
                    tokens = assignments // self.k
                    out = self.experts[j](x2.index_select(0, tokens))
                    y.index_add_(0, tokens, out * flat_weight[assignments].to(out.dtype))
                start = end
            return y

    return SeedDeepseekMoE


# ----------------------------------------------------------------------------------------------- building
def layer_config(smoke: bool, dtype: str):
    from deepseekmoe_jax.config import DeepseekConfig

    config = DeepseekConfig.from_file(CONFIG)
    changes = {"num_hidden_layers": 2, "first_k_dense_replace": 1}
    if smoke:
        changes.update(SMOKE_SHAPE)
    return config.replace(**changes, options={"dtype": dtype, "param_dtype": dtype, "moe_group_size": GROUP})


def v1_state_dict(block, config, prefix: str) -> dict[str, np.ndarray]:
    """The JAX block's weights as float32 v1 checkpoint tensors (``{prefix}mlp.gate.weight``,
    ``{prefix}mlp.experts.{j}.gate_proj.weight``, ...), through the project's HF key table."""
    from deepseekmoe_jax.hf_weights import KEY_TABLE, KeyScope

    out = {}
    for rule in KEY_TABLE:
        if rule.scope is not KeyScope.MOE_ONLY or not rule.when(config):
            continue
        node = block
        for part in rule.path.split("/")[1:]:  # paths are relative to a decoder layer: "mlp/experts/w_gate"
            node = getattr(node, part)
        value = np.asarray(node[...].astype("float32"))
        if rule.per_expert:
            for j in range(config.n_routed_experts):
                out[prefix + rule.hf.format(j=j)] = np.ascontiguousarray(rule.to_hf(value[j], config))
        else:
            out[prefix + rule.hf] = np.ascontiguousarray(rule.to_hf(value, config))
    return out


def build_seed(config, weights, torch_dtype, device):
    import torch

    cls = seed_module_class()
    with torch.device("meta"):
        module = cls(
            config.hidden_size,
            config.moe_intermediate_size,
            config.n_routed_experts,
            config.num_experts_per_tok,
            config.n_shared_experts or 0,
            config.norm_topk_prob,
            config.aux_loss_alpha,
            config.seq_aux,
        )
    state = {k[len("layer.mlp.") :]: torch.from_numpy(v) for k, v in weights.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device=device, dtype=torch_dtype)


def build_hf(config, weights, experts_impl, torch_dtype, device):
    """transformers ``DeepseekV2Moe`` for the v1 block, its experts implementation set to ``experts_impl``."""
    import torch
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    from deepseekmoe_jax.reference import load_reference_state_dict, reference_moe_config

    if config.norm_topk_prob and config.num_experts_per_tok > 1:
        raise RuntimeError("DeepseekV2Moe does not renormalise its top-k weights (norm_topk_prob is set)")
    moe_cfg = reference_moe_config(config, experts_impl)
    holder = torch.nn.Module()  # keys "layer.mlp.*", the layout load_reference_state_dict reads
    holder.layer = torch.nn.Module()
    with torch.device("meta"):
        holder.layer.mlp = DeepseekV2Moe(moe_cfg)
    holder.to_empty(device="cpu")
    load_reference_state_dict(holder, weights, config)
    return holder.layer.mlp.to(device=device, dtype=torch_dtype)


# ----------------------------------------------------------------------------------------------- timing
class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def fits(self, predicted: float) -> bool:
        return time.perf_counter() - self.start + predicted <= self.seconds


def time_calls(call: Callable[[], object], repeats: int, budget: Budget, predicted: float) -> dict:
    """One warm-up call, then up to ``repeats`` timed calls while they fit the budget."""
    if not budget.fits(predicted):
        return {"status": "(over budget)", "times": [], "warmup": None}
    t = time.perf_counter()
    call()
    warm = time.perf_counter() - t
    times = []
    while len(times) < repeats and budget.fits(times[-1] if times else warm):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return {"status": "ok", "times": times, "warmup": warm}


def cell_seconds(cell: dict) -> float | None:
    if cell.get("status") != "ok":
        return None
    return statistics.median(cell["times"]) if cell["times"] else cell["warmup"]


class Setup:
    """Everything the rows share: config, JAX weights and input, their v1 copy, the exact reference output."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from deepseekmoe_jax.moe import MoEBlock

        self.args = args
        self.dtype = "bfloat16" if args.gpu_mode else "float32"
        self.config = layer_config(args.smoke, self.dtype)
        self.jax_device = jax.devices("gpu" if args.device == "gpu" else "cpu")[0]
        with jax.default_device(self.jax_device):
            block = MoEBlock(self.config, rngs=nnx.Rngs(0))
        self.state = nnx.state(block)
        self.weights = v1_state_dict(block, self.config, "layer.")
        del block
        self.jnp_dtype = jnp.dtype(self.dtype)
        self.dispatch_modes = dispatch_modes()
        self.reference: dict[int, np.ndarray] = {}
        self._inputs: dict[int, tuple] = {}
        self._seed = None

    def inputs(self, tokens: int):
        """x [1, tokens, h] and the cotangent of the output, as float32 numpy arrays (fixed seeds)."""
        if tokens not in self._inputs:
            rng = np.random.default_rng(tokens)
            h = self.config.hidden_size
            self._inputs[tokens] = (
                rng.standard_normal((1, tokens, h), dtype=np.float32),
                rng.standard_normal((1, tokens, h), dtype=np.float32),
            )
        return self._inputs[tokens]

    # ---------------------------------------------------------------- torch
    def torch_env(self):
        import torch

        torch_dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        device = "cuda" if self.args.device == "gpu" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this PyTorch has no CUDA device")
        return torch, torch_dtype, device

    def seed_module(self):
        if self._seed is None:
            torch, torch_dtype, device = self.torch_env()
            self._seed = build_seed(self.config, self.weights, torch_dtype, device)
        return self._seed

    def reference_output(self, tokens: int) -> np.ndarray:
        """The seed algorithm's eval output for the token count: what every row is compared with."""
        if tokens not in self.reference:
            torch, torch_dtype, device = self.torch_env()
            x, _ = self.inputs(tokens)
            module = self.seed_module().eval()
            with torch.no_grad():
                y = module(torch.from_numpy(x).to(device=device, dtype=torch_dtype))
            self.reference[tokens] = y.float().cpu().numpy()
        return self.reference[tokens]

    def torch_calls(self, impl: Impl, tokens: int):
        torch, torch_dtype, device = self.torch_env()
        if impl.experts_impl is None:
            module = self.seed_module()
        else:
            module = build_hf(self.config, self.weights, impl.experts_impl, torch_dtype, device)
        x_np, g_np = self.inputs(tokens)
        x = torch.from_numpy(x_np).to(device=device, dtype=torch_dtype)
        g = torch.from_numpy(g_np).to(device=device, dtype=torch_dtype)
        params = list(module.parameters())
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        result = {}

        def fwd():
            module.eval()
            with torch.no_grad():
                y = module(x)
            sync()
            result["y"] = y

        def fwd_bwd():
            module.train()
            for p in params:
                p.grad = None
            xg = x.detach().requires_grad_(True)
            module(xg).backward(g)
            sync()

        def output():
            return result["y"].float().cpu().numpy(), None

        return fwd, fwd_bwd, output

    # ---------------------------------------------------------------- jax
    def jax_calls(self, impl: Impl, tokens: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from deepseekmoe_jax.moe import MoEBlock

        options = {"capacity_factor_train": impl.factor, "capacity_factor_eval": impl.factor}
        if self.dispatch_modes is not None:
            options["moe_dispatch"] = impl.dispatch
        config = self.config.with_options(**options)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoEBlock(config, rngs=nnx.Rngs(0))))
        x_np, g_np = self.inputs(tokens)
        x = jax.device_put(jnp.asarray(x_np, self.jnp_dtype), self.jax_device)
        g = jax.device_put(jnp.asarray(g_np, self.jnp_dtype), self.jax_device)

        def forward(state, x):
            out = nnx.merge(graphdef, state)(x, training=False)
            return out.out, out.metrics.dropped_fraction

        def loss(state, x, g):
            out = nnx.merge(graphdef, state)(x, training=True)
            return jnp.sum(out.out.astype(jnp.float32) * g.astype(jnp.float32)) + out.aux_loss

        fwd_c = jax.jit(forward).lower(self.state, x).compile()
        grad_c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(self.state, x, g).compile()
        result = {}

        def fwd():
            result["y"] = jax.block_until_ready(fwd_c(self.state, x))

        def fwd_bwd():
            jax.block_until_ready(grad_c(self.state, x, g))

        def output():
            y, dropped = result["y"]
            return np.asarray(y.astype(jnp.float32)), float(dropped)

        return fwd, fwd_bwd, output


def unavailable(setup: Setup, impl: Impl) -> str | None:
    if impl.kind != "jax" or impl.dispatch == "capacity":
        return None
    if setup.dispatch_modes is None:
        return "(not in the installed code: ModelOptions has no moe_dispatch)"
    if impl.dispatch not in setup.dispatch_modes:
        return f"(not in the installed code: moe_dispatch offers {', '.join(setup.dispatch_modes)})"
    return None


def run_row(setup: Setup, impl: Impl, tokens: int) -> dict:
    c = setup.config
    row = {"name": impl.name, "tokens": tokens, "fwd": {}, "fwd_bwd": {}, "dropped": None, "diff": None, "note": ""}
    if any(s.lower() in impl.name.lower() for s in setup.args.skip):
        row["note"] = "(skipped)"
        return row
    reason = unavailable(setup, impl)
    if reason:
        row["note"] = reason
        return row
    budget = Budget(setup.args.budget)
    t0 = time.perf_counter()
    try:
        reference = setup.reference_output(tokens)
        fwd, fwd_bwd, output = (setup.jax_calls if impl.kind == "jax" else setup.torch_calls)(impl, tokens)
    except Exception as e:  # a peer that cannot be built says why in its row
        row["note"] = f"(cannot build: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        traceback.print_exc()
        return row
    row["build_s"] = time.perf_counter() - t0
    for key, call, predicted in (("fwd", fwd, 0.0), ("fwd_bwd", fwd_bwd, None)):
        if predicted is None:
            fwd_s = cell_seconds(row["fwd"])
            predicted = GRAD_FACTOR * fwd_s if fwd_s is not None else 0.0
        try:
            row[key] = time_calls(call, setup.args.repeats, budget, predicted)
        except Exception as e:
            row[key] = {"status": f"(failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"}
            traceback.print_exc()
        if key == "fwd" and row["fwd"].get("status") == "ok":
            y, dropped = output()
            row["diff"] = float(np.abs(y - reference).max() / np.abs(reference).max())
            row["dropped"] = dropped if impl.capacity_mode else None
    del fwd, fwd_bwd, output
    if impl.kind == "torch" and setup._seed is not None:
        for param in setup._seed.parameters():
            param.grad = None  # the seed module stays for the reference outputs; its gradients need not
    gc.collect()
    h, i = c.hidden_size, c.moe_intermediate_size
    row["flops_fwd"] = 2 * 3 * h * i * (c.num_experts_per_tok + (c.n_shared_experts or 0)) * tokens
    print(f"  {impl.name} @ {tokens} tokens: {format_cell(row['fwd'])} / {format_cell(row['fwd_bwd'])}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------- output
def format_cell(cell: dict, repeats: int | None = None) -> str:
    if not cell:
        return "-"
    if cell.get("status") != "ok":
        return cell["status"]
    if not cell["times"]:
        return f"{1e3 * cell['warmup']:.2f} (warm-up)"
    text = f"{1e3 * statistics.median(cell['times']):.2f}"
    if repeats is not None and len(cell["times"]) < repeats:
        text += f" (n={len(cell['times'])})"
    return text


def table(rows: list[dict], repeats: int) -> str:
    lines = [
        "| implementation | tokens | fwd ms | fwd+bwd ms | useful TFLOP/s fwd | useful TFLOP/s fwd+bwd | dropped | "
        "diff | fwd+bwd vs grouped_mm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["tokens"]: cell_seconds(r["fwd_bwd"]) for r in rows if r["name"] == BASELINE and r["fwd_bwd"]}
    for r in rows:
        if r["note"]:
            lines.append(f"| {r['name']} | {r['tokens']} | {r['note']} | | | | | | |")
            continue
        f, fb = cell_seconds(r["fwd"]), cell_seconds(r["fwd_bwd"])
        tf = f"{r['flops_fwd'] / f / 1e12:.3g}" if f else "-"
        tfb = f"{GRAD_FACTOR * r['flops_fwd'] / fb / 1e12:.3g}" if fb else "-"
        dropped = f"{100 * r['dropped']:.1f}%" if r["dropped"] is not None else "-"
        diff = f"{r['diff']:.1e}" if r["diff"] is not None else "-"
        b = base.get(r["tokens"])
        ratio = f"{fb / b:.2f}x" if fb and b else "-"
        lines.append(
            f"| {r['name']} | {r['tokens']} | {format_cell(r['fwd'], repeats)} | "
            f"{format_cell(r['fwd_bwd'], repeats)} | {tf} | {tfb} | {dropped} | {diff} | {ratio} |"
        )
    return "\n".join(lines)


def environment(args, setup: Setup) -> str:
    import flax
    import jax
    import torch

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = "not installed"
    if args.device == "gpu":
        kind = f"{setup.jax_device.device_kind} (jax), " + (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA in torch"
        )
    else:
        kind = f"{platform.machine()} CPU, {os.cpu_count()} cores ({setup.jax_device.device_kind} backend)"
    c = setup.config
    mode = "smoke (GPU mode's code path on CPU, tiny shapes)" if args.smoke else args.device
    return (
        f"{datetime.date.today().isoformat()}; mode {mode}; device {kind}; {setup.dtype}; "
        f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"torch {torch.__version__}, transformers {tv}; layer h={c.hidden_size}, {c.n_routed_experts} experts of "
        f"{c.moe_intermediate_size}, {c.n_shared_experts} shared, top-{c.num_experts_per_tok}, group {GROUP}; "
        f"moe_dispatch offered: {', '.join(setup.dispatch_modes) if setup.dispatch_modes else 'none (capacity only)'}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def write_json(args, setup: Setup, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": environment(args, setup), "repeats": args.repeats, "rows": rows}, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: gpu when JAX sees one")
    p.add_argument("--smoke", action="store_true", help="the GPU mode's code path on CPU at tiny shapes")
    p.add_argument("--tokens", type=int, default=None, help="default 1024 (cpu), 8192 (gpu), 64 (smoke)")
    p.add_argument("--decode-tokens", type=int, default=1, help="token count of the decode rows (0: none)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per cell after the warm-up")
    p.add_argument("--budget", type=float, default=None, help="seconds per row (default 240; smoke 60)")
    p.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave out rows whose name has NAME")
    p.add_argument("--json", help="also write the rows and the environment line to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.smoke:
        if args.device == "gpu":
            p.error("--smoke runs on CPU; leave out --device gpu")
        args.device = "cpu"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # JAX would otherwise take most of the GPU's memory up front and leave little for the PyTorch rows.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.device is None:
        args.device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    if args.device == "gpu" and jax.default_backend() != "gpu":
        p.error(f"--device gpu: JAX's backend is {jax.default_backend()}")
    args.gpu_mode = args.device == "gpu" or args.smoke
    tokens = args.tokens or (64 if args.smoke else 8192 if args.device == "gpu" else 1024)
    if args.budget is None:
        args.budget = 60.0 if args.smoke else 240.0

    setup = Setup(args)
    e = setup.config.n_routed_experts
    runs = [(impl, tokens) for impl in IMPLS if not impl.decode_only or tokens < e]
    if args.decode_tokens:
        runs += [(impl, args.decode_tokens) for impl in IMPLS if impl.decode and args.decode_tokens < e]
    # Run the cheap rows and the baseline first (a run cut short by `timeout` still has them); print in IMPLS order.
    order = {name: i for i, name in enumerate(RUN_ORDER)}
    runs = sorted(runs, key=lambda r: (r[1] != tokens, order[r[0].name]))
    rows = []

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)  # `timeout` ends the run: still print what was measured
    try:
        for impl, n in runs:
            print(f"{impl.name}, {n} tokens", flush=True)
            rows.append(run_row(setup, impl, n))
            write_json(args, setup, rows)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'}): the rows not measured say so", flush=True)
        for impl, n in runs[len(rows) :]:
            rows.append({"name": impl.name, "tokens": n, "fwd": {}, "fwd_bwd": {}, "note": "(not run: interrupted)"})
    position = {impl.name: i for i, impl in enumerate(IMPLS)}
    rows.sort(key=lambda r: (r["tokens"] != tokens, position[r["name"]]))
    env = environment(args, setup)
    text = table(rows, args.repeats)
    print()
    print(env)
    print()
    print(text)
    write_json(args, setup, rows)
    ok = all(math.isfinite(r["diff"]) for r in rows if r.get("diff") is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
