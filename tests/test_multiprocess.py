"""A real two-process run: two Python processes on localhost, 4 CPU devices each, joined by JAX's distributed
runtime through `deepseekmoe_jax.distributed.initialize`, run one sharded training step (tests/mp_worker.py) with
each process loading only its half of the global batch. They must agree with each other and with the same step
run here in one process on 8 devices: loss and every updated parameter. The workers then save the updated model
together with `save_checkpoint` (each writing its own shards) and load it back; it is loaded here too, onto
another mesh.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from mp_worker import GLOBAL_BATCH, MESH, flatten, run_step

from deepseekmoe_jax import load_checkpoint, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mp_worker.py")
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4
TIMEOUT_S = 240
RTOL = 1e-5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(port: int, process_id: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(NUM_PROCESSES),
        JAX_PROCESS_ID=str(process_id),
    )
    return env


class Workers:
    """The worker processes; on any failure all are killed and their output is shown."""

    def __init__(self, tmp_path):
        port = free_port()
        self.outs = [tmp_path / f"process{i}.json" for i in range(NUM_PROCESSES)]
        self.logs = [open(tmp_path / f"process{i}.log", "w+b") for i in range(NUM_PROCESSES)]  # noqa: SIM115
        self.procs = [
            subprocess.Popen(
                [sys.executable, WORKER, "--out", str(self.outs[i]), "--save", str(tmp_path / "saved")],
                env=worker_env(port, i),
                cwd=ROOT,
                stdout=self.logs[i],
                stderr=subprocess.STDOUT,
            )
            for i in range(NUM_PROCESSES)
        ]

    def output(self) -> str:
        parts = []
        for i, log in enumerate(self.logs):
            log.flush()
            log.seek(0)
            text = log.read().decode(errors="replace")
            lines = [line for line in text.splitlines() if not line.startswith("[Gloo]")]
            parts.append(f"--- process {i} (exit {self.procs[i].poll()}) ---\n" + "\n".join(lines[-60:]))
        return "\n".join(parts)

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.procs):
            if any(p.poll() not in (None, 0) for p in self.procs):
                break  # one failed: the other would wait for it until its own timeouts
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if any(p.poll() != 0 for p in self.procs):
            timed_out = time.monotonic() > deadline
            self.kill()
            reason = f"timed out after {timeout_s:.0f} s" if timed_out else "a worker failed"
            pytest.fail(f"multi-process run: {reason}\n{self.output()}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.kill()
        for log in self.logs:
            log.close()


def test_two_processes_agree_with_one(tmp_path):
    workers = Workers(tmp_path)
    try:
        # The single-process run on this process's 8 devices, while the workers start up and compile.
        mesh = sharding.make_mesh(**MESH)
        assert mesh.devices.size == NUM_PROCESSES * DEVICES_PER_PROCESS == jax.device_count()
        feed = lambda batch, rules: sharding.shard_batch(batch, mesh, rules)  # noqa: E731
        expected_metrics, initial, expected, expected_updates = run_step(mesh, feed, gather_initial=True)
        workers.wait(TIMEOUT_S)
        results = [json.loads(out.read_text()) for out in workers.outs]
    finally:
        workers.close()

    for i, r in enumerate(results):
        assert r["launch"] == "JAX environment"
        assert (r["process_index"], r["process_count"]) == (i, NUM_PROCESSES)
        assert (r["device_count"], r["local_device_count"]) == (8, DEVICES_PER_PROCESS)
    # Each process loaded only its own half of the global batch.
    half = GLOBAL_BATCH // NUM_PROCESSES
    assert [r["rows"] for r in results] == [[i * half, (i + 1) * half] for i in range(NUM_PROCESSES)]
    # Both processes see the same replicated metrics, and they equal the single-process run.
    assert results[0]["metrics"] == results[1]["metrics"]
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(results[0]["metrics"][key], value, rtol=RTOL, err_msg=key)
    assert results[0]["metrics"]["update_sq"] > 0
    # The optimizer updates of every parameter, and the new parameter values that process 0 gathered from both
    # processes (these equal up to float32 rounding of the parameters themselves).
    got_updates, got_params = (dict(np.load(tmp_path / f"process0.{kind}.npz")) for kind in ("updates", "params"))
    want_updates, want_params, initial = flatten(expected_updates), flatten(expected), flatten(initial)
    assert sorted(got_updates) == sorted(want_updates) == sorted(got_params) == sorted(want_params)
    assert len(want_params) > 10
    for key, update in want_updates.items():
        assert np.abs(update).max() > 0, key
        np.testing.assert_allclose(got_updates[key], update, rtol=RTOL, atol=RTOL * np.abs(update).max(), err_msg=key)
        np.testing.assert_allclose(got_params[key], initial[key] + update, rtol=1e-6, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(got_params[key], want_params[key], rtol=1e-6, atol=1e-7, err_msg=key)

    # The model directory both processes wrote together: complete, nothing staged left behind, and it loads here
    # onto a different mesh with exactly the parameters the single-process step computed.
    saved = tmp_path / "saved"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert {"config.json", "deepseekmoe_jax.json", "params"} <= {p.name for p in saved.iterdir()}
    reloaded = load_checkpoint(str(saved), mesh=sharding.make_mesh(fsdp=2, expert=2, tensor=2))
    got = flatten(nnx.to_pure_dict(nnx.state(reloaded, nnx.Param)))
    assert sorted(got) == sorted(want_params)
    for key, value in want_params.items():
        np.testing.assert_allclose(np.asarray(got[key]), value, rtol=1e-6, atol=1e-7, err_msg=key)
