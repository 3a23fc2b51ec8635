"""LoRA export of atoms: file size and error vs rank on the SD-1.5 UNet (random weights).

For each atoms preset, the atoms' values are set to seeded random numbers (there is no trained
SD-1.5 run on this machine; the relative errors do not depend on their scale), every adapted
layer's dense update ΔW (``AtomLayer.get_delta_weight``) is reshaped to (c_out, c_in·k²) as
``sdatom export --lora`` does, and its singular values give, exactly, the relative Frobenius
error of the best rank-r pair (fp32; the file's fp16 rounding adds about 3e-4 on top, measured
on ``tiny`` in tests/test_lorafile.py). File sizes follow ``sdatom export --lora``'s rule: a
layer whose pair would be no smaller than the dense layer is stored dense (``--dense diff``),
fp16, tensor bytes only (the safetensors header adds some tens of kB).

  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_export.py [--model random:sd15]
      [--presets atoms,atoms-attn,atoms-oc] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402

from sdatom.atoms import AtomLayer, add_atoms, remove_atoms, trainable_parameters  # noqa: E402
from sdatom.lorafile import dense_limit  # noqa: E402
from sdatom.models import build_unet  # noqa: E402

RANKS = (4, 8, 16, 32, 64, 128, 256)
ERRORS = (0.01, 0.05, 0.1, 0.2, 0.5)
FP16 = 2


def spectra(unet, preset: str) -> list[dict]:
    """Per adapted layer: shape and the squared singular values of its reshaped ΔW."""
    add_atoms(unet, preset)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = []
    for name, layer in unet.named_modules():
        if not isinstance(layer, AtomLayer):
            continue
        with torch.no_grad():
            delta = layer.get_delta_weight().float()
        mat = delta.reshape(delta.shape[0], -1)
        s2 = torch.linalg.svdvals(mat).double() ** 2
        out.append({"name": name, "c_out": mat.shape[0], "n": mat.shape[1], "s2": s2})
    remove_atoms(unet)
    return out


def _tail(s2: torch.Tensor) -> list[float]:
    """tail[r]: the energy beyond the first r singular values (tail[0] = all of it)."""
    return torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]


def _summarise(layers: list[dict], ranks_of) -> dict:
    size, errs, dense, tails, totals, pair_tails = 0, [], 0, 0.0, 0.0, 0.0
    for layer in layers:
        c_out, n, s2 = layer["c_out"], layer["n"], layer["s2"]
        tail = layer["tail"]
        r = min(ranks_of(layer), s2.numel())
        total = tail[0]
        pair_tails += tail[r]  # every layer as a pair (--dense lora)
        if r > dense_limit(c_out, n):  # stored dense: exact up to fp16
            size += c_out * n * FP16
            dense += 1
            err = 0.0
        else:
            size += r * (c_out + n) * FP16 + FP16  # the pair + alpha
            err = math.sqrt(tail[r] / total) if total else 0.0
            tails += tail[r]
        totals += total
        errs.append(err)
    return {
        "bytes": size,
        "dense_layers": dense,
        "worst": max(errs),
        "median": statistics.median(errs),
        "overall": math.sqrt(tails / totals) if totals else 0.0,
        "overall_pairs_only": math.sqrt(pair_tails / totals) if totals else 0.0,
    }


def run(spec: str, presets: list[str]) -> dict:
    t0 = time.perf_counter()
    unet = build_unet(spec)
    result: dict = {"model": spec, "machine": bc.machine(), "presets": {}}
    for preset in presets:
        t1 = time.perf_counter()
        layers = spectra(unet, preset)
        for layer in layers:
            layer["tail"] = _tail(layer["s2"])
        dense_bytes = sum(layer["c_out"] * layer["n"] * FP16 for layer in layers)
        rows = {}
        for r in RANKS:
            rows[f"rank {r}"] = _summarise(layers, lambda layer, r=r: r)
        for e in ERRORS:

            def needed(layer, e=e):
                tail, bound = layer["tail"], e * e * layer["tail"][0]
                return max(1, next(k for k in range(len(tail)) if tail[k] <= bound))

            rows[f"max-error {e:g}"] = _summarise(layers, needed)
        result["presets"][preset] = {
            "layers": len(layers),
            "diff_bytes": dense_bytes,
            "rows": rows,
            "seconds": round(time.perf_counter() - t1, 1),
        }
        print(f"{preset}: {len(layers)} layers, {time.perf_counter() - t1:.0f} s", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(result: dict) -> str:
    lines = []
    for preset, p in result["presets"].items():
        lines.append(
            f"\n**{preset}** ({p['layers']} layers; exact `--diff` file: "
            f"{p['diff_bytes'] / 1e6:.1f} MB fp16)\n"
        )
        lines.append(
            "| setting | file (MB, fp16) | dense layers | worst layer | median layer | overall "
            "| overall, all pairs (`--dense lora`) |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for name, row in p["rows"].items():
            lines.append(
                f"| `--{name}` | {row['bytes'] / 1e6:.1f} | {row['dense_layers']} "
                f"| {row['worst']:.3f} | {row['median']:.3f} | {row['overall']:.3f} "
                f"| {row['overall_pairs_only']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--presets", default="atoms,atoms-attn,atoms-oc")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--table", type=Path, default=None, help="print a saved result's table")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    result = run(args.model, args.presets.split(","))
    print(table(result))
    print(f"\ntotal {result['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
