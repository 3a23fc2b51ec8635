"""Sampling benchmark: the base pipeline vs the same pipeline with atoms, merged and unmerged.

Same prompt, seed, steps and resolution; ``output_type="latent"`` (text encoding + the
denoising loop; the VAE decode is identical for all and left out). The atoms get small random
updates so merging changes the weights. The three states are timed round-robin in this
process (medians after warm-up): base (atoms disabled and unmerged), merged, unmerged.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sample.py [--model tiny] [--res 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402

from sdatom.atoms import add_atoms, merge_atoms, set_atoms_enabled, unmerge_atoms  # noqa: E402
from sdatom.models import build_pipeline  # noqa: E402


def run(spec: str, res: int, steps: int = 2, reps: int = 10, preset: str = "atoms") -> dict:
    """Median seconds per sample of base / merged / unmerged, and the ratios to base."""
    t0 = time.perf_counter()
    pipe = build_pipeline(spec)
    pipe.set_progress_bar_config(disable=True)
    add_atoms(pipe.unet, preset)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    build_s = time.perf_counter() - t0

    def sample() -> None:
        with torch.no_grad():
            pipe(
                "a photo of a sks dog",
                num_inference_steps=steps,
                height=res,
                width=res,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            )

    def state(name: str):
        def fn() -> None:
            if name == "merged":
                merge_atoms(pipe.unet)
            set_atoms_enabled(pipe.unet, name != "base")
            t = time.perf_counter()
            sample()
            elapsed = time.perf_counter() - t
            unmerge_atoms(pipe.unet)
            times[name].append(elapsed)

        return fn

    times: dict[str, list[float]] = {"base": [], "merged": [], "unmerged": []}
    bc.time_round_robin({n: state(n) for n in times}, reps=reps, warmup=1)
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}  # drop the warm-up
    return {
        "model": spec,
        "res": res,
        "steps": steps,
        "base_s": med["base"],
        "merged_s": med["merged"],
        "unmerged_s": med["unmerged"],
        "merged_vs_base": med["merged"] / med["base"],
        "unmerged_vs_base": med["unmerged"] / med["base"],
        "build_s": build_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    out = run(args.model, args.res, args.steps, args.reps)
    out["machine"] = bc.machine()
    print(bc.dump(out))


if __name__ == "__main__":
    main()
