"""Sampling text from a checkpoint: greedy, temperature, top-k and top-p (nucleus), by full re-forward.

Each new token re-runs the model over a fixed-length buffer (prompt + room for the new tokens), so there is one
compiled function and no KV cache. Causal attention and the exact (no-drop) MoE dispatch of evaluation mode make
the padding after the current position irrelevant. This is meant for small models and quick checks.

CLI::

    python -m deepseekmoe_jax.sample --checkpoint RUN/checkpoints/STEP --prompt "def "
    python -m deepseekmoe_jax.sample --checkpoint RUN            # the run's newest checkpoint
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseekmoe_jax.checkpoint import CONFIG_FILE, METADATA_FILE, find_config_dir, load_checkpoint, read_config
from deepseekmoe_jax.cli.args import Parser, finite_float
from deepseekmoe_jax.config import ConfigError, DeepseekConfig
from deepseekmoe_jax.param_store import CheckpointError
from deepseekmoe_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer, tokenizer_from_arg


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A directory holding ``params/``: ``path`` itself, or the newest ``checkpoints/<step>`` of a run directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "params")):
        return path
    ckpt_root = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_root):
        steps = sorted(
            (int(n) for n in os.listdir(ckpt_root) if n.isdigit() and os.path.isdir(os.path.join(ckpt_root, n))),
            reverse=True,
        )
        for step in steps:
            if os.path.isdir(os.path.join(ckpt_root, str(step), "params")):
                return os.path.join(ckpt_root, str(step))
    raise CheckpointError(
        f"{path}: neither a checkpoint (no params/) nor a run directory with checkpoints/<step>/params"
    )


DTYPES = ("bfloat16", "float32", "float16")


def _first_id(value) -> int | None:
    """A config's ``eos_token_id`` / ``bos_token_id`` (an int, a list of them, or null) -> one id or None."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _tokenizer_fallbacks(directory: str, config: DeepseekConfig | None) -> dict:
    """For a tokenizer.json without the usual eos/bos strings: the model config's ids, and what to do otherwise
    (this command has no --eos-token)."""
    config_path = os.path.join(directory, CONFIG_FILE).replace("{", "{{").replace("}", "}}")
    return {
        "eos_id": _first_id(config.eos_token_id) if config is not None else None,
        "bos_id": _first_id(config.bos_token_id) if config is not None else None,
        "hint": f"set {{what}}_token_id in {config_path} (or sample with --tokenizer bytes / --tokenizer PATH)",
    }


def checkpoint_tokenizer(checkpoint: str, config: DeepseekConfig | None = None) -> Tokenizer:
    """The tokenizer recorded with a checkpoint: the ``tokenizer`` entry of ``deepseekmoe_jax.json`` (written by
    train.py), else a ``tokenizer.json`` next to the config files. A tokenizer.json whose vocabulary has none of the
    usual eos/bos strings (common in converted checkpoints) takes ``config``'s ``eos_token_id``/``bos_token_id``."""
    directory = find_config_dir(checkpoint)
    fallbacks = _tokenizer_fallbacks(directory, config)
    meta_path = os.path.join(directory, METADATA_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            desc = json.load(f).get("tokenizer")
        if desc:
            return load_tokenizer(desc, directory, **fallbacks)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return tokenizer_from_arg(os.path.join(directory, "tokenizer.json"), **fallbacks)
    raise TokenizerError(
        f"{directory}: no tokenizer recorded with this checkpoint; pass --tokenizer bytes or --tokenizer PATH"
    )


def _tokenizer_name(tokenizer: Tokenizer) -> str:
    path = getattr(tokenizer, "path", None)
    return f"tokenizer {path}" if path else "the byte-level tokenizer ('bytes')"


def check_prompt_ids(ids: Sequence[int], vocab_size: int, tokenizer: Tokenizer) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer that does not belong to the model)."""
    for i in ids:
        if not 0 <= int(i) < vocab_size:
            raise TokenizerError(
                f"prompt token id {int(i)} from {_tokenizer_name(tokenizer)} is outside the model's vocabulary "
                f"(vocab_size {vocab_size}: ids 0..{vocab_size - 1}); this tokenizer does not belong to the model: "
                "pass the model's own with --tokenizer"
            )


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits [V] float32 -> scaled logits with tokens outside top-k / the top-p nucleus set to -inf."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        before = jnp.cumsum(probs) - probs  # probability mass ranked above each token
        keep_sorted = before < top_p  # the smallest prefix whose mass reaches top_p (first token always kept)
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"))
def _next_token(graphdef, state, buf, cur, key, *, temperature: float, top_k: int, top_p: float):
    """The token after position ``cur - 1`` of ``buf`` [1, L] (model in evaluation mode)."""
    model = nnx.merge(graphdef, state)
    logits = model(buf, training=False).logits[0]  # [L, V]
    last = jax.lax.dynamic_index_in_dim(logits, cur - 1, axis=0, keepdims=False)  # [V]
    if temperature <= 0:
        return jnp.argmax(last).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(last, temperature, top_k, top_p)).astype(jnp.int32)


def generate(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """Continue ``prompt_ids``; returns only the new ids (stopping after ``eos_id``, which is not returned).

    ``temperature=0`` is greedy decoding. The buffer is ``len(prompt) + max_new_tokens`` long, capped at the
    model's ``max_position_embeddings``.
    """
    config = model.config
    n = len(prompt_ids)
    if n == 0:
        raise ValueError("the prompt is empty after tokenization; give at least one token")
    limit = config.max_position_embeddings
    if n >= limit:
        raise ValueError(f"the prompt has {n} tokens; the model's max_position_embeddings is {limit}")
    length = min(n + max_new_tokens, limit)
    graphdef, state = nnx.split(model)
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    buf = np.zeros((1, length), np.int32)
    buf[0, :n] = np.asarray(prompt_ids, np.int32)
    key = jax.random.key(seed)
    out: list[int] = []
    for cur in range(n, length):
        key, sub = jax.random.split(key)
        tok = int(_next_token(graphdef, state, jnp.asarray(buf), jnp.int32(cur), sub, **sampling))
        if eos_id is not None and tok == eos_id:
            break
        buf[0, cur] = tok
        out.append(tok)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        prog="python -m deepseekmoe_jax.sample",
        description="Generate text from a deepseekmoe-jax checkpoint (full re-forward per token; for small models).",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint step directory, model directory or run dir")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from the eos token)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=finite_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=finite_float, default=0.95, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="override: 'bytes' or a tokenizer.json path")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="parameter dtype to load into (bfloat16, float32, float16); default: as saved"
    )
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, --max-new-tokens >= 1")
    try:
        path = resolve_checkpoint(args.checkpoint)
        config = read_config(find_config_dir(path))
        if args.tokenizer:
            fallbacks = _tokenizer_fallbacks(find_config_dir(path), config)
            tokenizer = tokenizer_from_arg(args.tokenizer, **fallbacks)
        else:
            tokenizer = checkpoint_tokenizer(path, config)
        ids = tokenizer.encode(args.prompt).tolist() if args.prompt else [tokenizer.eos_id]
        check_prompt_ids(ids, config.vocab_size, tokenizer)
        model = load_checkpoint(path, dtype=args.dtype)
        eos = model.config.eos_token_id
        eos = eos[0] if isinstance(eos, tuple) else eos
        new = generate(
            model,
            ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eos_id=eos,
        )
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{path}]", file=sys.stderr)
    sys.stdout.write(args.prompt + tokenizer.decode(new) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
