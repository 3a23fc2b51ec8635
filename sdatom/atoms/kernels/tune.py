"""The measured choice of a conv path: time the candidates on the layer's own shape, once.

Which of ``conv`` (oneDNN/cuDNN with the summed weight and a weight gradient) and ``gemm``
(im2col, no weight gradient) is faster depends on the shape, the batch, the device and the
library's kernels (oneDNN's direct and Winograd convolutions beat a GEMM at high resolution
on some CPUs and not on others). A fixed threshold on positions per channel got SD-1.5 right
at 128 px and wrong at 512 px, so for large shapes the dispatch measures instead: at the
first training forward of a shape (grad enabled), each candidate runs forward + backward on
the layer's own weight and a random input of that shape (one warm-up, then the median of
``REPS``), and the fastest is kept in an in-process table for the rest of the run.

Small shapes (under ``MIN_MACS`` multiply-adds per forward: every SD-1.5 3×3 shape at 128 px
batch 1, every test layer, and the 512 px shapes at 8×8 outputs, where the rule is right) keep
the fixed rule: a measurement there costs more than it can win, and the choice
stays deterministic. ``SDATOM_KERNEL_TUNING=0`` turns measuring off (the fixed rule
everywhere). Every path is exact, so the choice changes speed and rounding only.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

#: shapes with fewer multiply-adds per forward (B·L·c_out·c_in·k²) keep the fixed rule
MIN_MACS = 1e9
REPS = 3
_table: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


def enabled() -> bool:
    """Whether large shapes are measured (``SDATOM_KERNEL_TUNING`` is not ``0``)."""
    return os.environ.get("SDATOM_KERNEL_TUNING", "1") != "0"


def applies(x: torch.Tensor, conv: torch.nn.Conv2d, positions: int) -> bool:
    """Whether this call is measured: tuning on, a training forward, a large enough shape."""
    if not (enabled() and torch.is_grad_enabled()):
        return False
    macs = positions * conv.out_channels * conv.weight[0].numel()
    return macs >= MIN_MACS


def key(x: torch.Tensor, conv: torch.nn.Conv2d, dtype: torch.dtype, per_channel: bool) -> tuple:
    return (
        x.device.type,
        str(dtype),
        tuple(x.shape),
        tuple(conv.weight.shape),
        tuple(conv.stride),
        str(conv.padding),
        tuple(conv.dilation),
        per_channel,
    )


def choose(k: tuple, candidates: Sequence[str], run: Callable[[str], None]) -> str:
    """The fastest of ``candidates`` for key ``k``; ``run(path)`` is one forward + backward."""
    if k in _table:
        return _table[k]
    device = k[0]

    def timed(path: str) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(path)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for path in candidates:
        run(path)  # warm-up (allocations, oneDNN primitive creation)
    times: dict[str, list[float]] = {p: [] for p in candidates}
    for rep in range(REPS):  # round-robin, alternating order: drift hits all alike
        for path in candidates if rep % 2 == 0 else candidates[::-1]:
            times[path].append(timed(path))
    medians = {p: statistics.median(v) for p, v in times.items()}
    best = min(medians, key=medians.__getitem__)
    _table[k], _timings[k] = best, medians
    return best


def table() -> list[dict]:
    """The measured choices so far: key fields, the chosen path and each candidate's ms."""
    rows = []
    for k, path in _table.items():
        device, dtype, x_shape, w_shape = k[:4]
        ms = {p: round(t * 1e3, 2) for p, t in _timings[k].items()}
        rows.append(
            {
                "device": device,
                "dtype": dtype,
                "input": list(x_shape),
                "weight": list(w_shape),
                "stride": list(k[4]),
                "per_channel": k[7],
                "path": path,
                "ms": ms,
            }
        )
    return rows


def clear() -> None:
    """Forget every measured choice (tests, benchmarks)."""
    _table.clear()
    _timings.clear()
