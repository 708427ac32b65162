"""Stop requests: SIGTERM and a first SIGINT become a request to stop (a second SIGINT aborts), and `StopVote`,
by which the processes of a multi-process run agree on when to stop."""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

EXIT_TERMINATED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on request


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn SIGTERM and a first SIGINT into a stop request (``event.is_set()``); a second SIGINT aborts."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {}

    def handler(signum, frame):
        if signum == signal.SIGINT and event.is_set():
            raise KeyboardInterrupt
        event.signum = signum
        event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def signal_name(stop: threading.Event) -> str:
    """The name of the signal that set ``stop`` (an event of `stop_on_signals`), e.g. "SIGTERM"."""
    return signal.Signals(getattr(stop, "signum", signal.SIGTERM)).name


class StopVote:
    """The stop decision of a multi-process run, taken by all processes together.

    A signal may reach only some processes, or reach them between different steps. If one process stopped on its
    own, it would start the collective checkpoint save while the others ran the next step, and the run would hang.
    So each process's stop request rides into the compiled step as its share of a small int32 array [devices]
    (`flags`), the step returns its maximum as a replicated scalar (no extra collective program), and `agreed`
    reads that result for the step before the one just dispatched: every process sees the same value after the
    same step, and one step stays in flight meanwhile. A request is acted on one or two steps after it arrives.
    """

    def __init__(self, mesh):
        self.size = mesh.size
        self.sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        self.abstract = jax.ShapeDtypeStruct((self.size,), jnp.int32, sharding=self.sharding)
        self._recent: collections.deque = collections.deque(maxlen=2)
        # The only two arrays a process ever passes, built once: a step then costs no host-to-device copy.
        self._flags = tuple(self._build_flags(value) for value in (0, 1))

    def _build_flags(self, value: int) -> jax.Array:
        return jax.make_array_from_callback(
            (self.size,), self.sharding, lambda index: np.full(len(range(self.size)[index[0]]), value, np.int32)
        )

    def flags(self, requested: bool) -> jax.Array:
        """This process's request on each of its devices, as a global int32 array [devices]."""
        return self._flags[int(bool(requested))]

    def record(self, any_requested: jax.Array) -> None:
        """Keep the step's output (a replicated scalar, still being computed)."""
        self._recent.append(any_requested)

    def agreed(self) -> bool:
        """Whether any process had asked to stop by the step before the last one dispatched."""
        return len(self._recent) == 2 and bool(self._recent[0])


def with_stop_vote(step_fn: Callable) -> Callable:
    """``step_fn(state, batch) -> (state, metrics)`` extended with the `StopVote` flags:
    ``(state, batch, flags [devices]) -> (state, metrics, max(flags))``."""

    def step(state, batch, flags):
        state, metrics = step_fn(state, batch)
        return state, metrics, jnp.max(flags)

    return step
