"""``verify``: logits of a converted JAX model against the PyTorch reference on the original HF weights.

Both models run in float32 (weights widened exactly from their stored dtype) on the same random token batches, so
any difference beyond float32 rounding comes from the conversion, not from bfloat16 arithmetic. The JAX side uses
the exact no-drop MoE dispatch (the evaluation default). ``num_layers`` truncates both models to their first
layers (embedding, those layers, final norm and head), so a 16B checkpoint can be checked on a machine that cannot
hold it twice in float32.

Non-finite numbers never pass: a NaN or inf in either side's parameters or logits is a failure that names the side
(JAX or PyTorch) and its first non-finite parameter (JAX path or HF key), and every comparison is written so that a
NaN fails it (``max`` would otherwise skip a NaN batch, and ``NaN <= tolerance`` is merely False).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseekmoe_jax.checkpoint import find_config_dir, read_config
from deepseekmoe_jax.config import DeepseekConfig, differing_fields
from deepseekmoe_jax.convert.common import ConvertError, log
from deepseekmoe_jax.convert.hf_to_jax import check_against_config, read_hf_config
from deepseekmoe_jax.hf_io import HFCheckpoint
from deepseekmoe_jax.hf_weights import iter_targets
from deepseekmoe_jax.param_store import ParamsReader, leaf_path, leaf_specs, model_from_params


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """``max_rel`` = max |JAX - torch| / max |torch logit| over all batches (NaN once any logit is non-finite);
    ``top1`` = fraction of positions whose argmax agrees; ``problems`` = non-finite parameters or logits, one line
    per side (any of them fails the check)."""

    max_rel: float
    max_abs: float
    top1: float
    tolerance: float
    num_layers: int
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems and math.isfinite(self.max_rel) and self.max_rel <= self.tolerance


def _worse(a: float, b: float) -> float:
    """The larger of two error measures; NaN if either is NaN (the built-in ``max`` keeps whichever comes first)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _non_finite(value) -> int:
    value = np.asarray(value)
    return int(value.size - np.count_nonzero(np.isfinite(value)))


@dataclasses.dataclass
class _Side:
    """What verify records about one side's numbers: its first non-finite parameter and non-finite logits."""

    name: str  # "JAX" or "PyTorch"
    what: str  # how its parameters are named
    first_bad: tuple[str, int] | None = None  # (parameter, count of NaN/inf values)
    bad_params: int = 0
    bad_logits: int = 0
    logits: int = 0
    bad_batches: int = 0

    def scan(self, name: str, value) -> None:
        n = _non_finite(value)
        if n:
            self.bad_params += 1
            if self.first_bad is None:
                self.first_bad = (name, n)

    def problem(self) -> str | None:
        first = ""
        if self.first_bad is not None:
            name, n = self.first_bad
            more = f" ({self.bad_params} parameters hold NaN/inf)" if self.bad_params > 1 else ""
            first = f"first non-finite parameter {self.what} {name} ({n:,} NaN/inf value(s)){more}"
        if self.bad_logits:
            logits = (
                f"{self.name} logits are non-finite: {self.bad_logits:,} of {self.logits:,} values NaN/inf in "
                f"{self.bad_batches} batch(es)"
            )
            return f"{logits}; {first}" if first else f"{logits}, although every parameter is finite (overflow?)"
        if first:
            return f"{self.name} parameters are non-finite: {first}"
        return None


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    """float32 logits [B, T, V]; jitted once per model structure (repeated checks of one model reuse it)."""
    return nnx.merge(graphdef, state)(ids).logits


def _require_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConvertError(
            f"verify needs PyTorch and transformers for the reference model ({e}); install them with "
            "pip install torch transformers (the CPU build of torch is enough)"
        ) from None


def _truncated(config: DeepseekConfig, num_layers: int | None) -> DeepseekConfig:
    n = config.num_hidden_layers if num_layers is None else num_layers
    if not 1 <= n <= config.num_hidden_layers:
        raise ConvertError(f"--num-layers {n}: expected 1..{config.num_hidden_layers}")
    return config.replace(num_hidden_layers=n).with_options(
        param_dtype="float32", dtype="float32", capacity_factor_eval=None
    )


def _jax_params(reader: ParamsReader, full: DeepseekConfig, sub: DeepseekConfig, side: _Side) -> dict:
    """The parameters of the truncated model ``sub``, read slice by slice from the full checkpoint."""
    specs = leaf_specs(sub)
    params = {p: np.zeros(s.shape, np.float32) for p, s in specs.items()}
    full_targets = dict(iter_targets(full))
    slab_key, slab = None, None
    for key, target in iter_targets(sub):
        src = full_targets[key]
        path = leaf_path(src.path)
        if src.index:
            if slab_key != (path, src.index[0]):
                slab_key, slab = (path, src.index[0]), reader.read(path, src.index[:1])
            value = slab[src.index[1:]] if len(src.index) > 1 else slab
        else:
            value = reader.read(path)
        dst = params[leaf_path(target.path)]
        if target.index:
            dst[target.index] = value
        else:
            dst[...] = value
    for path, value in params.items():
        side.scan("/".join(path), value)
    return params


def verify_parity(
    hf_dir: str,
    jax_dir: str,
    *,
    num_layers: int | None = None,
    batches: int = 3,
    batch_size: int = 2,
    seq_len: int = 32,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> ParityResult:
    """Compare float32 logits of the JAX checkpoint ``jax_dir`` with the PyTorch reference built from ``hf_dir``.

    Returns a `ParityResult`; the caller decides what to do with ``ok``. Raises `ConvertError` when the two
    directories do not describe the same model or torch/transformers are missing.
    """
    for name, value in (("batches", batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:  # nothing would be compared, and the check would pass vacuously
            raise ConvertError(f"{name}={value}: must be at least 1")
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConvertError(f"--tolerance {tolerance}: must be a finite number >= 0 (default 1e-4)")
    _require_torch()
    import torch

    from deepseekmoe_jax.reference import build_reference, load_reference_state_dict, reference_logits

    hf_dir, jax_dir = os.path.abspath(hf_dir), os.path.abspath(jax_dir)
    hf_config = read_hf_config(hf_dir)
    reader = ParamsReader(jax_dir)
    jax_config = read_config(find_config_dir(os.path.dirname(reader.params_dir)))
    a, b = hf_config.to_hf(metadata=False), jax_config.to_hf(metadata=False)
    diff = differing_fields(a, b)
    if diff:
        k, in_hf, in_jax = diff[0]
        raise ConvertError(
            f"{hf_dir} and {jax_dir} describe different models: config.json field {k} is {in_hf!r} vs {in_jax!r}"
            f"{f' ({len(diff)} fields differ)' if len(diff) > 1 else ''}"
        )
    reader.check_matches(jax_config)
    reader.check_complete()
    sub = _truncated(jax_config, num_layers)
    log(
        f"verify: {hf_dir} vs {jax_dir}: {sub.num_hidden_layers} of {jax_config.num_hidden_layers} layers, "
        f"{batches} batch(es) of {batch_size} x {seq_len} random tokens, float32, tolerance {tolerance:g}"
    )

    torch_side, jax_side = _Side("PyTorch", "(HF key)"), _Side("JAX", "(JAX path)")
    with HFCheckpoint.open(hf_dir) as ckpt:
        check_against_config(ckpt, hf_config)
        state = {}
        for key, _ in iter_targets(sub):
            value = np.asarray(ckpt.read(key), dtype=np.float32)
            torch_side.scan(key, value)
            state[key] = torch.from_numpy(value)
    reference = build_reference(sub, seed=seed)
    load_reference_state_dict(reference, state, sub)
    del state

    model = model_from_params(sub, _jax_params(reader, jax_config, sub, jax_side))
    model.eval()
    graphdef, model_state = nnx.split(model)

    rng = np.random.default_rng(seed)
    worst_rel = worst_abs = 0.0
    agree = total = 0
    for n in range(batches):
        ids = rng.integers(0, sub.vocab_size, (batch_size, seq_len))
        ref = reference_logits(reference, ids)
        got = np.asarray(_logits(graphdef, model_state, jnp.asarray(ids, jnp.int32)))
        finite = True
        for side, logits in ((torch_side, ref), (jax_side, got)):
            bad = _non_finite(logits)
            side.logits += logits.size
            if bad:
                side.bad_logits += bad
                side.bad_batches += 1
                finite = False
        if finite:
            abs_diff = float(np.max(np.abs(got - ref)))
            rel = abs_diff / max(float(np.max(np.abs(ref))), 1e-30)
        else:
            abs_diff = rel = math.nan
        agree += int(np.sum(got.argmax(-1) == ref.argmax(-1)))
        total += ids.size
        worst_rel, worst_abs = _worse(worst_rel, rel), _worse(worst_abs, abs_diff)
        note = "" if finite else " (non-finite logits)"
        log(f"verify: batch {n}: max |diff| {abs_diff:.3e}, relative to max |logit| {rel:.3e}{note}")
    problems = tuple(p for p in (jax_side.problem(), torch_side.problem()) if p)
    return ParityResult(worst_rel, worst_abs, agree / max(total, 1), tolerance, sub.num_hidden_layers, problems)
