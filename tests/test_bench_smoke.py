"""bench/moe_layer.py runs its GPU mode's code path end to end (``--smoke``: bfloat16, tiny shapes, on CPU).

One subprocess; the markdown table it prints must have a row for every implementation and token count, and every
row must either carry numbers that parse or say why the installed code does not offer that dispatch mode (only
allowed while `ModelOptions` lacks the mode).
"""

import json
import os
import subprocess
import sys

from conftest import ROOT

from deepseekmoe_jax.config import ModelOptions

SCRIPT = os.path.join(ROOT, "bench", "moe_layer.py")
SMOKE_EXPERTS = 8  # bench/moe_layer.py SMOKE_SHAPE
IMPLEMENTATIONS = (
    "jax capacity cf=1.5",
    "jax capacity cf=1.25",
    "jax capacity no-drop",
    "jax dropless",
    "torch seed DeepseekMoE",
    "transformers DeepseekV2Moe eager",
    "transformers DeepseekV2Moe grouped_mm",
)
DECODE = ("jax capacity no-drop", "jax dropless", "jax gather", "torch seed DeepseekMoE")
DECODE += IMPLEMENTATIONS[-2:]


def _number(text: str) -> float:
    return float(text.split(" ")[0].rstrip("x%"))


def _table(stdout: str) -> dict[tuple[str, int], list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if not line.startswith("| ") or line.startswith("| implementation") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[(cells[0], int(cells[1]))] = cells[2:]
    return rows


def test_moe_layer_smoke(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, SCRIPT, "--smoke", "--repeats", "1", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _table(result.stdout)
    expected = [(name, 64) for name in IMPLEMENTATIONS] + [(name, 1) for name in DECODE]
    assert sorted(rows) == sorted(expected), result.stdout
    field = ModelOptions.__dataclass_fields__.get("moe_dispatch")
    for (name, tokens), cells in rows.items():
        fwd, fwd_bwd, tf_fwd, tf_bwd, dropped, diff, ratio = cells
        if fwd.startswith("(not in the installed code"):
            assert name in ("jax dropless", "jax gather") and field is None, (name, fwd)
            continue
        assert not fwd.startswith("("), (name, tokens, fwd)  # no "(cannot build ...)", "(failed ...)", budget
        for text in (fwd, fwd_bwd, tf_fwd, tf_bwd, diff, ratio):
            assert _number(text) >= 0, (name, tokens, text)
        assert _number(fwd) > 0 and _number(fwd_bwd) > 0
        if "cf=" not in name:  # exact implementations agree with the seed algorithm (bfloat16 here)
            assert _number(diff) < 5e-2, (name, tokens, diff)
        if "capacity" in name:
            assert 0 <= _number(dropped) <= 100
        else:
            assert dropped == "-"
    data = json.loads(out.read_text())
    assert len(data["rows"]) == len(expected) and "jax" in data["environment"]
    assert all(tokens < SMOKE_EXPERTS for name, tokens in rows if name == "jax gather")
