"""Channel atoms on the SD-1.5 attention Linear shapes: forward+backward time per path.

Compares the frozen layer (input gradient only), peft LoRA r=4, and channel atoms on the
generic autograd path and on the fused path (sdatom/atoms/channel.py). Medians of --reps
after warm-up, one thread, in one process:

    OMP_NUM_THREADS=1 python scripts/bench_channel.py [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from sdatom.atoms import AtomConfig, add_atoms
from sdatom.atoms.kernels import force_path

# (out, in, tokens): SD-1.5 attention projections at 128 px, batch 2 (classifier-free pairs).
SHAPES = [(320, 320, 256), (320, 768, 77), (640, 640, 64), (1280, 1280, 16), (1280, 768, 77)]


def _ms(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    for _ in range(3):
        module(x).sum().backward()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        module(x).sum().backward()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| out×in, tokens | frozen ms | lora r4 | atoms generic | atoms fused |")
    print("|---|---:|---:|---:|---:|")
    for out_f, in_f, tokens in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(2, tokens, in_f, requires_grad=True)
        frozen = nn.Sequential(nn.Linear(in_f, out_f)).requires_grad_(False)
        lora = inject_adapter_in_model(
            LoraConfig(r=4, target_modules=["0"]), nn.Sequential(nn.Linear(in_f, out_f))
        )
        atoms = nn.Sequential(nn.Linear(in_f, out_f))
        add_atoms(atoms, AtomConfig(target_modules=["0"]))
        base = _ms(frozen, x, args.reps)
        row = [base, _ms(lora, x, args.reps)]
        for path in ("generic", "fused"):
            with force_path(path):
                row.append(_ms(atoms, x, args.reps))
        cells = " | ".join(f"{v:.2f} ({v / base:.1f}×)" for v in row[1:])
        print(f"| {out_f}×{in_f}, {tokens} | {base:.2f} | {cells} |")


if __name__ == "__main__":
    main()
