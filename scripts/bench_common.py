"""Shared helpers of the bench_*.py scripts: threads, machine facts, timing, peak memory.

Timing: every method of a comparison runs in the same process, round-robin (one repetition of
each in turn, so drift hits all alike) after warm-up; we report medians.

Peak memory on the CPU: torch has no CPU allocator statistics and tracemalloc does not see
torch's allocations, so we measure the process's peak resident set size (VmHWM). Each
configuration runs in a child forked from a parent that has built the model but run nothing:
the child returns freed heap memory to the OS (malloc_trim), resets VmHWM (writing 5 to
/proc/self/clear_refs), reads VmRSS, runs, then reads VmHWM. The figure is that rise: the
pages the step itself needed (activations, saved tensors, gradients, temporaries), measured at
4 KiB page granularity by the kernel, not by torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version, thread setting and date (for BENCHMARKS.md)."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": datetime.date.today().isoformat(),
    }


def time_round_robin(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin after ``warmup`` calls each.

    The order alternates (forward, reversed) from one repetition to the next.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:  # alternate order: no position bias
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(conn: Any, fn: Callable[[], Any], setup: Callable[[], Any] | None, warmup: int) -> None:
    try:
        if setup is not None:
            setup()
        for _ in range(warmup):
            fn()
        ok = _reset_peak()
        rss0 = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        conn.send({"peak_rise_mib": (peak - rss0) / 1024, "peak_rss_mib": peak / 1024, "ok": ok})
    except BaseException:  # report the child's failure to the parent instead of hanging
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()
        os._exit(0)


def peak_rss_rise(
    fn: Callable[[], Any], setup: Callable[[], Any] | None = None, warmup: int = 1
) -> dict[str, float]:
    """In a forked child: ``setup()``, ``warmup`` calls of ``fn``, then one measured call.

    Returns the child's peak RSS and its rise over the RSS before the measured call (MiB).
    """
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, setup, warmup))
    proc.start()
    child.close()
    out = parent.recv()
    proc.join()
    if "error" in out:
        raise RuntimeError("memory child failed:\n" + out["error"])
    if not out.pop("ok"):
        out["peak_rise_mib"] = float("nan")  # VmHWM could not be reset: no honest figure
    return out


def saved_bytes(fn: Callable[[], Any], exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct tensors autograd saves for backward during ``fn`` (not ``exclude``).

    Exact and deterministic: what a method keeps alive between forward and backward, beyond
    the parameters it shares with the frozen model.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(b) else float("nan")


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=None, sort_keys=False, default=float)


def write_report_section(path, name: str, lines: list[str]) -> None:
    """Rewrite only the ``<!-- name: start -->`` ... ``<!-- name: end -->`` part of a report
    file (QUALITY.md): the rest is kept; the section is appended when the markers are absent."""
    from pathlib import Path

    from sdatom.fileio import atomic_write_text

    path = Path(path)
    start, end = f"<!-- {name}: start -->", f"<!-- {name}: end -->"
    text = "\n".join([start, *lines, end])
    old = path.read_text() if path.is_file() else ""
    if start in old and end in old:
        text = old[: old.index(start)] + text + old[old.index(end) + len(end) :]
    elif old:
        text = old.rstrip() + "\n\n" + text + "\n"
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")
