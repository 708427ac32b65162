"""Peak memory and throughput of ``deepseekmoe-convert`` at full deepseek-moe-16b widths.

Writes synthetic HF checkpoints with the real 16B tensor shapes (hidden 2048, 64 routed experts of width 1408,
2 shared experts, dense layer 0 of width 10944, vocab 102400, 16 heads; bfloat16, safetensors shards with an
index) but only a few layers, converts each with ``python -m convert hf-to-jax`` in a child process and back with
``jax-to-hf``, and reports each child's peak resident memory (its own ``VmHWM``), time and MB/s.

Requirement checked: hf-to-jax peak RSS does not grow with the number of layers (within 10%) and stays under 4 GB,
i.e. memory is bounded by a layer, not by the model. The synthetic files are removed afterwards (``--keep`` keeps
them). Usage::

    python bench/convert_memory.py                      # 2 and 6 layers, files under $TMPDIR
    python bench/convert_memory.py --layers 2 6 --workdir /scratch/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from deepseekmoe_jax.config import DeepseekConfig  # noqa: E402
from deepseekmoe_jax.config_files import read_config_file  # noqa: E402
from deepseekmoe_jax.convert.common import versions_line  # noqa: E402
from deepseekmoe_jax.hf_io import (  # noqa: E402
    HFCheckpoint,
    PlannedTensor,
    SafetensorsWriter,
    numpy_dtype,
    parse_size,
    plan_shards,
    write_index,
)
from deepseekmoe_jax.hf_weights import hf_key_shapes  # noqa: E402

# deepseek-moe-16b-base's config.json (the preset holds it field for field); the benchmark changes the layer count.
CONFIG_16B = read_config_file(os.path.join(ROOT, "configs", "deepseekmoe-16b.yaml"))["model"]


def synthetic_checkpoint(directory: str, layers: int, shard_bytes: int, seed: int = 0) -> int:
    """Write a bf16 checkpoint of the 16B shapes with ``layers`` layers; returns its tensor bytes.

    Each tensor is generated just before it is written (finite bfloat16 values with |x| < 2 from random bits),
    so the generator holds one tensor at a time.
    """
    os.makedirs(directory)
    hf = dict(CONFIG_16B, num_hidden_layers=layers)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    config = DeepseekConfig.from_hf(hf)
    bf16 = numpy_dtype("bfloat16")
    plan = [PlannedTensor(k, s, bf16) for k, s in hf_key_shapes(config).items()]
    shards = plan_shards(plan, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    rng = np.random.default_rng(seed)
    for shard, name in zip(shards, names, strict=True):
        with SafetensorsWriter(os.path.join(directory, name), shard) as w:
            for t in shard:
                bits = rng.integers(0, 2**16, size=t.shape, dtype=np.uint16) & np.uint16(0xBFFF)
                w.write(t.key, bits.view(bf16))
    write_index(directory, shards, names)
    return sum(t.nbytes for t in plan)


# Runs ``python -m convert ARGS`` and, on exit, writes the process's own peak resident size (VmHWM, which belongs
# to the memory image created by exec) to the file named by the last argument. ``ru_maxrss`` from wait4 would
# not do: it also counts the parent's pages at fork time, i.e. this benchmark process.
_CHILD = """
import runpy, sys
out = sys.argv.pop()
sys.argv[0] = "convert"
try:
    runpy.run_module("convert", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    with open(out, "w") as f:
        f.write(hwm)
"""


def run_child(args: list[str], workdir: str) -> tuple[float, float, str]:
    """Run ``python -m convert ARGS``; returns (seconds, peak RSS in bytes, stderr)."""
    os.sync()  # start from a quiet disk: write-back of earlier steps would slow this child's writes
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    hwm_file = os.path.join(workdir, "child-vmhwm")
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args, "--no-progress", hwm_file],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")
    with open(hwm_file) as f:
        peak = int(f.read()) * 1024.0  # kB
    os.remove(hwm_file)
    return seconds, peak, proc.stderr


def spot_check(src: str, back: str) -> None:
    """A few tensors of the round trip must equal the source bit for bit."""
    with HFCheckpoint.open(src) as a, HFCheckpoint.open(back) as b:
        assert sorted(a.tensors) == sorted(b.tensors)
        keys = list(a.tensors)
        for key in (keys[0], keys[len(keys) // 2], keys[-1], "model.layers.1.mlp.experts.63.down_proj.weight"):
            x, y = a.read(key), b.read(key)
            assert x.shape == y.shape and np.array_equal(x.view(np.uint16), y.view(np.uint16)), key


def machine() -> str:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPU cores{mem}, {platform.platform()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "deepseekmoe-convert-bench"))
    p.add_argument("--shard-size", default="2GB", help="source shard size (the 16B release uses ~4.7 GB)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    p.add_argument("--skip-back", action="store_true", help="do not run jax-to-hf")
    args = p.parse_args()

    print(f"machine: {machine()}")
    print(f"versions: {versions_line(devices=False)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    if os.path.exists(args.workdir):
        raise SystemExit(f"{args.workdir} exists; remove it or pass another --workdir")
    rows = []
    try:
        for layers in args.layers:
            base = os.path.join(args.workdir, f"{layers}L")
            src, jax_dir, back = base + "-hf", base + "-jax", base + "-back"
            t = time.time()
            nbytes = synthetic_checkpoint(src, layers, parse_size(args.shard_size))
            print(f"[{layers} layers] synthetic checkpoint {nbytes / 1e9:.2f} GB written in {time.time() - t:.0f} s")
            seconds, rss, _ = run_child(["hf-to-jax", src, jax_dir], args.workdir)
            rows.append(("hf-to-jax", layers, nbytes, rss, seconds))
            print(f"[{layers} layers] hf-to-jax: {seconds:.1f} s, peak RSS {rss / 2**30:.2f} GiB")
            if not args.skip_back:
                seconds, rss, _ = run_child(["jax-to-hf", jax_dir, back], args.workdir)
                rows.append(("jax-to-hf", layers, nbytes, rss, seconds))
                print(f"[{layers} layers] jax-to-hf: {seconds:.1f} s, peak RSS {rss / 2**30:.2f} GiB")
                spot_check(src, back)
            if not args.keep:
                for d in (src, jax_dir, back):
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    print()
    print("| command | layers | checkpoint (GB) | peak RSS (GiB) | time (s) | throughput (MB/s) |")
    print("|---|---|---|---|---|---|")
    for cmd, layers, nbytes, rss, seconds in rows:
        rate = nbytes / 1e6 / seconds
        print(f"| {cmd} | {layers} | {nbytes / 1e9:.2f} | {rss / 2**30:.2f} | {seconds:.1f} | {rate:.0f} |")
    print()
    ok = True
    for cmd in ("hf-to-jax", "jax-to-hf"):
        rss = {layers: r for c, layers, _, r, _ in rows if c == cmd}
        if len(rss) < 2:
            continue
        lo, hi = min(rss), max(rss)
        growth = rss[hi] / rss[lo] - 1
        bounded = growth <= 0.10 and max(rss.values()) < 4 * 2**30
        ok &= bounded or cmd != "hf-to-jax"
        print(
            f"{cmd}: peak RSS {lo} -> {hi} layers changes by {growth:+.1%}, max {max(rss.values()) / 2**30:.2f} GiB: "
            + ("PASS (within 10%, under 4 GiB)" if bounded else "FAIL")
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
