"""Decomposition benchmark: time to set up atoms on the SD-1.5 UNet (random weights).

linear   add_atoms(unet, preset) on the whole UNet (SVD of each layer's filters + wrapping)
lasso    AtomConfig(coder="lasso") (dictionary learning + FISTA), cold (empty cache) and on
         a cache hit, on one 1280×1280 3×3 layer (the reference solver: 64 s, DESIGN §1);
         the whole UNet when --whole-lasso is given, else extrapolated by filter count
         (the solver's work is linear in the number of filters N = c_out·c_in).

  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_decompose.py [--whole-lasso] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sdatom.atoms import AtomConfig, AtomConv2d, add_atoms, remove_atoms  # noqa: E402
from sdatom.models import build_unet  # noqa: E402

REFERENCE_LAYER_S = 64.0  # official solver, one 1280×1280 3×3 layer (DESIGN §1)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(spec: str = "random:sd15", whole_lasso: bool = False, reps: int = 3) -> dict:
    out: dict = {"model": spec}
    unet = build_unet(spec)
    for preset in ("atoms", "atoms-attn"):
        times = []
        for _ in range(reps):
            times.append(_timed(lambda p=preset: add_atoms(unet, p)))
            remove_atoms(unet)
        out[f"linear_{preset}_s"] = sorted(times)[len(times) // 2]
    convs = [m for m in unet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    filters_3x3 = sum(m.weight.shape[0] * m.weight.shape[1] for m in convs)
    filters_1x1 = sum(
        m.weight.shape[0] * m.weight.shape[1]
        for m in unet.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    )
    torch.manual_seed(0)
    layer = nn.Conv2d(1280, 1280, 3, padding=1)
    cfg = AtomConfig(coder="lasso")
    with tempfile.TemporaryDirectory() as cache:
        out["lasso_layer_1280_cold_s"] = _timed(
            lambda: AtomConv2d(layer, cfg, "filter", cache_dir=cache)
        )
        out["lasso_layer_1280_cached_s"] = _timed(
            lambda: AtomConv2d(layer, cfg, "filter", cache_dir=cache)
        )
    out["lasso_speedup_vs_reference_layer"] = REFERENCE_LAYER_S / out["lasso_layer_1280_cold_s"]
    per_filter = out["lasso_layer_1280_cold_s"] / (1280 * 1280)
    out["lasso_whole_unet_3x3_extrapolated_s"] = per_filter * filters_3x3
    out["filters_3x3"], out["filters_1x1"] = filters_3x3, filters_1x1
    if whole_lasso:
        with tempfile.TemporaryDirectory() as cache:
            out["lasso_whole_unet_cold_s"] = _timed(lambda: add_atoms(unet, cfg, cache_dir=cache))
            remove_atoms(unet)
            out["lasso_whole_unet_cached_s"] = _timed(lambda: add_atoms(unet, cfg, cache_dir=cache))
            remove_atoms(unet)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--whole-lasso", action="store_true", help="also the whole-UNet lasso")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args.model, args.whole_lasso)
    out["machine"] = bc.machine()
    print(bc.dump(out))


if __name__ == "__main__":
    main()
