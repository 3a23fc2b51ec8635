"""Layer-level benchmark: one SD-1.5 conv or attention projection, forward + backward.

Methods on the same layer (input gradient always needed, as inside a UNet):
  frozen      the layer alone, no trainable parameter: the floor
  atoms       AtomConv2d, linear coder, m = 9 (default dispatch: sdatom/atoms/kernels)
  atoms-conv  the same, forced onto the generic path (one conv fwd + convolution_backward
              with the weight gradient, contracted into ΔD)
  atoms-gemm  the same, forced onto the im2col path (3×3 only)
  atoms-oc    overcomplete atoms (m1 = 3; generic path)
  reference   the official formulation: conv(x, W) + conv(x, α·ΔD) with α (N, m) stored
  lora-r4     peft LoRA (LoCon for convs) rank 4
  lora-rN     peft LoRA at the rank whose parameter count is closest to atoms-oc's
For Linear projections: frozen, atoms (channel atoms k_c = 4, m_c = 64), lora-r4.

``--res 512``: the layer profile of a 512 px step instead: every distinct 3×3 conv of the
SD-1.5 UNet at 512 px (c_in→c_out, input side, stride; with how many layers have it), batch 1,
frozen / atoms (default dispatch, measured choice) / atoms-conv / atoms-gemm / lora-r4, and the
count-weighted sum over the UNet's 52 3×3 convs.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_layers.py [--quick] [--json]
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_layers.py --res 512 --no-memory --json
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sdatom.atoms import AtomConfig, AtomConv2d, AtomLinear  # noqa: E402
from sdatom.atoms.kernels import force_path  # noqa: E402
from sdatom.atoms.method import filter_rows, linear_atoms, projector  # noqa: E402

# (label, channels, latent side, batch) of SD-1.5's 3×3 convs: 128 px → latent 16, 512 → 64.
CONV_128 = [("320@16", 320, 16), ("640@8", 640, 8), ("1280@4", 1280, 4), ("1280@2", 1280, 2)]
CONV_512 = [("320@64", 320, 64), ("640@32", 640, 32), ("1280@16", 1280, 16), ("1280@8", 1280, 8)]
# Every 3×3 conv of SD-1.5 in a 512 px step (latent 64): (c_in, c_out, input side, stride) →
# number of layers, from forward hooks on random:sd15 (52 layers).
UNET_3X3_512 = {
    (4, 320, 64, 1): 1, (320, 4, 64, 1): 1, (320, 320, 64, 1): 7, (320, 320, 64, 2): 1,
    (640, 320, 64, 1): 2, (960, 320, 64, 1): 1, (640, 640, 64, 1): 1,
    (320, 640, 32, 1): 1, (640, 640, 32, 1): 6, (640, 640, 32, 2): 1, (960, 640, 32, 1): 1,
    (1280, 640, 32, 1): 1, (1920, 640, 32, 1): 1, (1280, 1280, 32, 1): 1,
    (640, 1280, 16, 1): 1, (1280, 1280, 16, 1): 7, (1280, 1280, 16, 2): 1,
    (1920, 1280, 16, 1): 1, (2560, 1280, 16, 1): 2,
    (1280, 1280, 8, 1): 11, (2560, 1280, 8, 1): 3,
}  # fmt: skip
# 1×1 convs (proj_in/proj_out) and attention projections (tokens = latent side²)
CONV1_128 = [("1x1 640@8", 640, 8)]
LINEAR_128 = [("to_q 320 x256", 320, 320, 256), ("to_k 768->640 x77", 768, 640, 77)]


class ReferenceAtomConv(nn.Module):
    """The official code's layer: conv(x, W) + conv(x, α·ΔD), α (N, m) stored (frozen)."""

    def __init__(self, conv: nn.Conv2d, num_atoms: int = 9) -> None:
        super().__init__()
        self.conv = conv.requires_grad_(False)
        rows = filter_rows(conv.weight.detach())
        d0 = linear_atoms(rows, num_atoms)
        self.register_buffer("alpha", rows @ projector(d0))  # (N, m): stored coefficients
        self.delta = nn.Parameter(torch.zeros(num_atoms, rows.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        update = (self.alpha @ self.delta).reshape(w.shape)
        return self.conv(x) + F.conv2d(x, update, None, self.conv.stride, self.conv.padding)


def lora(layer: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(collections.OrderedDict(layer=layer.requires_grad_(False)))
    return inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"]), model
    )


def oc_matching_rank(c_in: int, c_out: int, k: int) -> int:
    """LoRA/LoCon rank whose parameter count is closest to atoms-oc's (m = 9, m1 = 3)."""
    kk = k * k
    oc = 9 * kk + c_in * 9 * 3 + 9 * 3 * kk
    return max(1, round(oc / (c_in * kk + c_out)))


def conv_methods(
    c: int, k: int, quick: bool, c_out: int | None = None, stride: int = 1
) -> dict[str, Callable[[], nn.Module]]:
    torch.manual_seed(0)
    base = nn.Conv2d(c, c_out or c, k, stride=stride, padding=k // 2)
    rank = oc_matching_rank(c, c_out or c, k)
    methods: dict[str, Callable[[], nn.Module]] = {
        "frozen": lambda: copy.deepcopy(base).requires_grad_(False),
        "atoms": lambda: AtomConv2d(copy.deepcopy(base), AtomConfig(), "filter"),
    }
    if k > 1:
        methods["reference"] = lambda: ReferenceAtomConv(copy.deepcopy(base))
    methods["lora-r4"] = lambda: lora(copy.deepcopy(base), 4)
    if not quick:
        oc = AtomConfig(num_sub_atoms=3)
        methods["atoms-oc"] = lambda: AtomConv2d(copy.deepcopy(base), oc, "filter")
        methods[f"lora-r{rank}"] = lambda: lora(copy.deepcopy(base), rank)
    return methods


def linear_methods(c_in: int, c_out: int) -> dict[str, Callable[[], nn.Module]]:
    torch.manual_seed(0)
    base = nn.Linear(c_in, c_out, bias=False)
    cfg = AtomConfig(channel_modules=("x",))
    return {
        "frozen": lambda: copy.deepcopy(base).requires_grad_(False),
        "atoms": lambda: AtomLinear(copy.deepcopy(base), cfg, "channel"),
        "lora-r4": lambda: lora(copy.deepcopy(base), 4),
    }


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, path: str | None) -> None:
    with force_path(path):
        y = module(x)
    y.backward(dy)
    x.grad = None
    for p in module.parameters():
        p.grad = None


def bench_case(
    methods: dict[str, Callable[[], nn.Module]],
    shape: tuple[int, ...],
    reps: int,
    memory: bool,
    extra_paths: bool,
) -> dict[str, dict[str, float]]:
    """Median fwd+bwd seconds (and optionally peak RSS rise, saved bytes) per method."""
    x = torch.randn(shape, requires_grad=True)
    modules = {name: make() for name, make in methods.items()}
    with torch.no_grad():
        dy = torch.randn_like(modules["frozen"](x))
    runs: dict[str, tuple[nn.Module, str | None]] = {n: (m, None) for n, m in modules.items()}
    if extra_paths and isinstance(modules["atoms"], AtomConv2d):
        runs["atoms-conv"] = (modules["atoms"], "conv")
        if modules["atoms"].base_layer.kernel_size[0] > 1:
            runs["atoms-gemm"] = (modules["atoms"], "gemm")
    out: dict[str, dict[str, float]] = {n: {} for n in runs}
    if memory:  # children forked before this process has run any step
        for name, (mod, path) in runs.items():
            out[name]["peak_rise_mib"] = bc.peak_rss_rise(lambda m=mod, p=path: _step(m, x, dy, p))[
                "peak_rise_mib"
            ]
    for name, (mod, path) in runs.items():
        params = list(mod.parameters()) + list(mod.buffers())

        def fwd(m: nn.Module = mod, p: str | None = path) -> None:
            with force_path(p):
                m(x)

        out[name]["saved_mib"] = bc.saved_bytes(fwd, params + [x]) / 2**20
    fns = {n: (lambda m=m, p=p: _step(m, x, dy, p)) for n, (m, p) in runs.items()}
    for name, sec in bc.time_round_robin(fns, reps=reps, warmup=1).items():
        out[name]["ms"] = sec * 1e3
    return out


def run_unet_512(memory: bool = False, reps: int = 3) -> dict[str, Any]:
    """The 512 px layer profile: every distinct SD-1.5 3×3 conv, batch 1, and the sums."""
    from sdatom.atoms.kernels import tune

    results: dict[str, Any] = {}
    totals: dict[str, float] = collections.defaultdict(float)
    for (ci, co, side, stride), n in UNET_3X3_512.items():
        label = f"3x3 {ci}->{co}@{side}" + (f" s{stride}" if stride > 1 else "") + f" x{n}"
        methods = conv_methods(ci, 3, True, co, stride)
        methods.pop("reference")
        tune.clear()
        res = bench_case(methods, (1, ci, side, side), reps, memory, extra_paths=True)
        rows = tune.table()
        res["atoms"]["path"] = rows[0]["path"] if rows else "rule"
        results[label] = res
        for name, v in res.items():
            totals[name] += n * v["ms"]
        print(
            f"# {label}: " + ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in res.items()),
            file=sys.stderr,
        )
    return {"cases": results, "total_ms_3x3": dict(totals)}


def run(quick: bool = False, memory: bool = True, smoke: bool = False) -> dict[str, Any]:
    """All layer cases; ``quick``: 128 px 3×3 shapes, batch 1; ``smoke``: one tiny conv."""
    cases: list[tuple[str, dict, tuple[int, ...]]] = []
    if smoke:
        cases.append(("smoke 32@4 b1", conv_methods(32, 3, True), (1, 32, 4, 4)))
        reps = 2
    else:
        reps = 5 if quick else 7
        batches = (1,) if quick else (1, 2)
        shapes = CONV_128 if quick else CONV_128 + CONV_512
        for b in batches:
            for label, c, s in shapes:
                cases.append((f"3x3 {label} b{b}", conv_methods(c, 3, quick), (b, c, s, s)))
        if not quick:
            for label, c, s in CONV1_128:
                cases.append((f"{label} b1", conv_methods(c, 1, True), (1, c, s, s)))
            for label, ci, co, n in LINEAR_128:
                cases.append((f"{label} b1", linear_methods(ci, co), (1, n, ci)))
    results = {}
    for label, methods, shape in cases:
        r = 3 if ("@64" in label or "@32" in label) else reps
        results[label] = bench_case(methods, shape, r, memory, extra_paths=not (smoke or quick))
        print(
            f"# {label}: " + ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in results[label].items()),
            file=sys.stderr,
        )
    ref = [
        v["atoms"]["ms"] / v["reference"]["ms"]
        for k, v in results.items()
        if k.startswith(("3x3", "smoke")) and "reference" in v
    ]
    return {"cases": results, "atoms_vs_reference_layer_time": bc.geomean(ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 px shapes, batch 1, fewer reps")
    ap.add_argument("--smoke", action="store_true", help="one tiny conv (tests)")
    ap.add_argument("--no-memory", action="store_true", help="skip the forked peak-RSS runs")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--res", type=int, default=None, help="512: the 512 px UNet layer profile")
    args = ap.parse_args()
    if args.res == 512:
        res = run_unet_512(memory=not args.no_memory)
    elif args.res is not None:
        ap.error("--res takes 512 (the other shapes are the default set)")
    else:
        res = run(quick=args.quick, memory=not args.no_memory, smoke=args.smoke)
    res["machine"] = bc.machine()
    if args.json:
        print(bc.dump(res))
        return
    if args.res == 512:
        for label, methods in res["cases"].items():
            floor = methods["frozen"]["ms"]
            cells = ", ".join(f"{k} {v['ms'] / floor:.2f}x" for k, v in methods.items())
            print(f"{label:28s} frozen {floor:7.1f} ms  {cells}  ({methods['atoms']['path']})")
        t = res["total_ms_3x3"]
        print("sum over the 52 3x3 convs: " + ", ".join(f"{k} {v:.0f} ms" for k, v in t.items()))
        return
    for label, methods in res["cases"].items():
        floor = methods["frozen"]["ms"]
        print(f"\n{label}")
        for name, v in methods.items():
            mem = v.get("peak_rise_mib", float("nan"))
            print(
                f"  {name:11s} {v['ms']:9.2f} ms  {v['ms'] / floor:5.2f}x frozen  "
                f"saved {v['saved_mib']:8.2f} MiB  peak rise {mem:8.1f} MiB"
            )
    print(f"\natoms / reference (geomean, 3x3): {res['atoms_vs_reference_layer_time']:.3f}")


if __name__ == "__main__":
    main()
