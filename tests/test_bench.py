"""Smoke test of the benchmark scripts: they run and report the keys BENCHMARKS.md uses.

Checks the shape of the output only (keys present, positive finite numbers); no timing is
asserted, the machine is shared.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
    "atoms_vs_loraconv_time",
    "atoms_vs_loraconv_peak_mem",
    "atoms_vs_full_time",
    "atoms_vs_loraattn_time",
    "atoms_vs_frozen_time",
    "atoms_vs_reference_layer_time",
    "merged_vs_base_sampling",
]


@pytest.mark.slow
def test_bench_train_smoke_prints_one_json_object_with_the_ratios():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--smoke", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for key in KEYS:
        value = out[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert set(out["unet"]) >= {"frozen", "atoms", "lora-conv", "lora-attn", "full"}
    assert out["unet"]["atoms"]["trainable"] > 0 and out["unet"]["frozen"]["trainable"] == 0
    assert out["machine"]["threads"] == 1


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_check_on_the_cpu():
    """The GPU script is prepared without a GPU: its --smoke mode (tiny model, CPU, bf16
    autocast) runs every check so that the real run cannot fail on a typo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    checks = {r["check"] for r in rows}
    assert checks == {"step", "ratios", "kernels", "grad1x1", "sample", "e2e"}
    steps = {r["method"] for r in rows if r["check"] == "step"}
    assert steps == {"frozen", "atoms", "atoms-attn", "lora-attn", "lora-conv"}
    ratios = next(r for r in rows if r["check"] == "ratios")
    assert ratios["atoms_vs_lora-conv_step_s"] > 0 and ratios["atoms-attn_vs_lora-attn_step_s"] > 0
    grad = next(r for r in rows if r["check"] == "grad1x1")
    assert grad["finite"] and grad["rel_error"] < 2 * grad["eps"]
    held = {r["state"]: r["held_bytes"] for r in rows if r["check"] == "sample"}
    assert held["merged"] == held["unmerged"] < held["merged-reversible"]
    e2e = next(r for r in rows if r["check"] == "e2e")
    assert e2e["returncode"] == 0 and e2e["mixed_precision"] == "no", e2e
