"""Test setup: 8 fake CPU devices (set before jax is imported) and shared tiny configs."""

import os

# 8 fake CPU devices for the sharding tests. The two optimisation flags (LLVM -O0, the classic CPU kernel
# generator) make XLA compile these tiny models several times faster; they act after partitioning and only on
# code generation speed, and are left out if this XLA build does not know them.
_DEVICES = "--xla_force_host_platform_device_count=8"
_FAST = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
    import subprocess
    import sys

    probe = "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode == 0


if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = f"{_DEVICES} {_FAST}" if _xla_accepts(f"{_DEVICES} {_FAST}") else _DEVICES
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from deepseekmoe_jax import DeepseekConfig  # noqa: E402

try:  # tiny reference models gain nothing from intra-op threads, and threads contend with XLA's on 2 cores
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a test dependency
    pass

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A small MoE config: 1 dense layer then 3 MoE layers, 8 experts top-2, one shared expert.
SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=64,
)


def small_config(**changes) -> DeepseekConfig:
    """The shared small test config with HF fields (and ``options=`` dict) replaced."""
    options = changes.pop("options", None)
    fields = {**SMALL, **changes}
    return DeepseekConfig(**fields, options=options or {})


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return ROOT


@pytest.fixture(scope="module")
def cli(repo_root):
    """``train.py`` imported as a module, to call its ``main(argv)`` (exit status, messages) in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", repo_root / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_config() -> DeepseekConfig:
    return DeepseekConfig.from_file(ROOT / "configs" / "tiny.yaml")


def jit_forward(model, ids, mask=None, **kwargs):
    """``model(ids, mask, **kwargs)`` compiled (eager NNX calls compile every op separately, which is slow on CPU)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    key = (graphdef, tuple(sorted(kwargs.items())))
    fn = _FORWARDS.get(key)
    if fn is None:
        fn = _FORWARDS[key] = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m, **kwargs))
    return fn(state, ids, mask)


_FORWARDS: dict = {}
