"""Metric writers: a tqdm progress bar on the console, a JSONL file and (optionally) TensorBoard.

Records are flat dicts of numbers or lists (per-MoE-layer values). ``RUN/metrics.jsonl`` has one JSON object per
line with at least ``step``; training records carry ``loss``, ``lm_loss``, ``aux_loss``, ``grad_norm``,
``learning_rate``, ``tokens_per_second``, ``mfu`` (when a peak is known), ``dropped_fraction`` and
``load_imbalance`` (lists, one value per MoE layer); evaluation records carry ``eval_loss`` and
``eval_perplexity``. On resume, records past the restored step are dropped so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from deepseekmoe_jax.fs import write_text_atomically

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records with ``step > last_step`` (rewritten aside, then renamed)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("step", 0) <= last_step:
                kept.append(json.dumps(rec))
    write_text_atomically(path, "".join(k + "\n" for k in kept))


def has_record(path: str, step: int, key: str) -> bool:
    """Whether the metrics file holds a record of ``step`` with ``key`` (e.g. the final ``eval_loss``); lines cut
    short by a kill and a missing file count as no record."""
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step") == step and key in rec:
                return True
    return False


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a metrics file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsLogger:
    """Console progress bar + JSONL + TensorBoard. Only the main process (``enabled=True``) writes anything."""

    def __init__(
        self,
        run_dir: str,
        *,
        total_steps: int,
        start_step: int,
        tensorboard: bool = True,
        enabled: bool = True,
        progress: bool = True,
    ):
        from tqdm import tqdm

        self.enabled = enabled
        self.jsonl_path = os.path.join(run_dir, JSONL_FILE)
        self._tb = None
        self._file = None
        self.notes: list[str] = []
        if enabled:
            truncate_jsonl(self.jsonl_path, start_step)
            self._file = open(self.jsonl_path, "a", encoding="utf-8")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    self.notes.append(
                        "TensorBoard logging is off: tensorboardX is not installed "
                        "(pip install tensorboardX, or deepseekmoe-jax[tensorboard]); metrics still go to "
                        f"{self.jsonl_path}"
                    )
                else:
                    self._tb = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=start_step + 1)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="training",
            unit="step",
            disable=not (enabled and progress),
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must contain ``step``) to the JSONL file and TensorBoard."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step" or value is None:
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        if isinstance(v, int | float):
                            self._tb.add_scalar(f"{key}/moe_layer_{i}", v, step)
                elif isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def advance(self, steps: int = 1, **postfix) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        """Print above the progress bar (main process only)."""
        if self.enabled:
            self.bar.write(text, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
