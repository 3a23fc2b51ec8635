"""UNet training-step benchmark (+ the layer and sampling ratios), fp32 on the CPU.

One training step = UNet forward on a noisy latent (batch 1) with a random text embedding
(1, 77, cross_attention_dim), MSE loss, backward. No optimizer step (for ``full`` that would
add AdamW over 860M parameters: not timed, stated in BENCHMARKS.md). Methods:
  frozen      no trainable parameter; the latent requires grad so backward runs (the floor)
  atoms, atoms-attn, atoms-oc   sdatom presets (add_atoms)
  lora-attn   peft LoRA r=4 on to_q/to_k/to_v/to_out.0 (diffusers' DreamBooth-LoRA default)
  lora-conv   peft LoRA r=4 on the same conv layers as ``atoms`` (LoCon-style)
  full        every UNet parameter trainable (forward + backward only)
Timing: all methods in this process, one after another (adapters cannot coexist), 1 warm-up
step then the median of ``reps`` steps; ``frozen`` runs first and last to show drift. Peak
memory: one forked child per method (see bench_common.py).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train.py --quick --json   # < 4 min
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train.py                  # the full set
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train.py --smoke --json   # tiny, seconds
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train.py --res 512 --json # ~15 min

``--res 512`` runs the 512 px set (frozen, atoms, atoms-attn, lora-attn, lora-conv: the
issue-14 targets) interleaved: one warm-up round (where atoms measure their kernel paths),
then ``reps`` rounds in which every method is set up, timed for one step and removed, in
alternating order, so that the load of a shared machine hits all methods alike. It reports
the UNet ratios, peak memory and the measured kernel table, not the layer or sampling sets
(``bench_layers.py --res 512`` gives the layer profile). ``--methods a b`` picks the methods
of any run and ``--unet-only`` skips the layer and sampling sets, e.g.
``--res 128 --methods frozen atoms-oc atoms lora-conv --unet-only --json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import bench_layers  # noqa: E402
import bench_sample  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sdatom.atoms import add_atoms, find_targets, remove_atoms  # noqa: E402
from sdatom.models import build_unet  # noqa: E402

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
ALL_METHODS = ["frozen", "atoms", "atoms-attn", "atoms-oc", "lora-attn", "lora-conv", "full"]
QUICK_METHODS = ["frozen", "atoms", "lora-conv", "lora-attn", "full"]
RES512_METHODS = ["frozen", "atoms", "atoms-attn", "lora-attn", "lora-conv"]


def _strip_peft(model: torch.nn.Module) -> None:
    """Put back the base layers of every peft LoRA wrapper (undo inject_adapter_in_model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def setup_method(unet: torch.nn.Module, method: str) -> Callable[[], None]:
    """Make ``method``'s parameters trainable on ``unet``; return the undo function."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    if method in ("atoms", "atoms-attn", "atoms-oc"):
        add_atoms(unet, method)
        return lambda: remove_atoms(unet)
    if method in ("lora-attn", "lora-conv"):
        targets = ATTENTION if method == "lora-attn" else find_targets(unet, "atoms")
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), unet)
        return lambda: _strip_peft(unet)
    if method == "full":
        unet.requires_grad_(True)
        return lambda: unet.requires_grad_(False)
    if method == "frozen":
        return lambda: None
    raise ValueError(method)


def make_inputs(unet: torch.nn.Module, res: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    side = res // 8
    p = next(unet.parameters())
    out = {
        "latent": torch.randn(1, unet.config.in_channels, side, side, generator=g),
        "emb": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
        "target": torch.randn(1, unet.config.out_channels, side, side, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size ids
        pooled = unet.config.projection_class_embeddings_input_dim
        pooled -= 6 * unet.config.addition_time_embed_dim
        out["text_embeds"] = torch.randn(1, pooled, generator=g)
        out["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)
    return {k: v.to(p.device, p.dtype) for k, v in out.items()}


def train_step(unet: torch.nn.Module, inputs: dict[str, torch.Tensor], method: str) -> None:
    x = inputs["latent"].clone().requires_grad_(method == "frozen")
    t = torch.tensor([500], device=x.device)
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    out = unet(x, t, encoder_hidden_states=inputs["emb"], added_cond_kwargs=added or None).sample
    F.mse_loss(out.float(), inputs["target"].float()).backward()
    for p in unet.parameters():
        p.grad = None
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def count(unet: torch.nn.Module, method: str) -> int:
    if method == "frozen":
        return 0
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def measure_memory(unet, inputs, methods: list[str], out: dict[str, dict[str, float]]) -> None:
    """Each method's peak RSS rise of one step, in a child forked from this process before it
    ran any step (the child sets the method up and exits after)."""
    for method in methods:
        mem = bc.peak_rss_rise(
            lambda m=method: train_step(unet, inputs, m),
            setup=lambda m=method: setup_method(unet, m),
        )
        out[method].update(mem)
        print(f"# {method}: peak rise {mem['peak_rise_mib']:.0f} MiB", file=sys.stderr)


def bench_unet(
    spec: str,
    res: int,
    methods: list[str],
    reps: int,
    memory: list[str],
    drift_check: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, float]]:
    t0 = time.perf_counter()
    unet = build_unet(spec, device)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    unet.requires_grad_(False)
    cuda = device.startswith("cuda")
    if cuda:  # peak memory from the CUDA allocator, in-process (no fork)
        memory = []
    inputs = make_inputs(unet, res)
    print(f"# built {spec} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    measure_memory(unet, inputs, memory, out)
    order = methods + (["frozen"] if "frozen" in methods and drift_check else [])
    for i, method in enumerate(order):
        undo = setup_method(unet, method)
        out[method]["trainable"] = count(unet, method)
        train_step(unet, inputs, method)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            train_step(unet, inputs, method)
            rise = torch.cuda.max_memory_allocated() - before
            out[method]["peak_rise_mib"] = rise / 2**20
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            train_step(unet, inputs, method)
            times.append(time.perf_counter() - t)
        undo()
        key = "step_s" if i < len(methods) else "step_s_end"
        out[method][key] = statistics.median(times)
        print(f"# {method}: {out[method][key]:.3f} s/step", file=sys.stderr)
    return out


def bench_unet_interleaved(
    spec: str, res: int, methods: list[str], reps: int, memory: list[str]
) -> dict[str, dict[str, float]]:
    """Like :func:`bench_unet` (CPU), but round-robin over methods: a warm-up round, then
    ``reps`` rounds of (set up, one timed step, undo) per method in alternating order."""
    t0 = time.perf_counter()
    unet = build_unet(spec, "cpu")
    unet.requires_grad_(False)
    inputs = make_inputs(unet, res)
    print(f"# built {spec} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    measure_memory(unet, inputs, memory, out)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rnd in range(reps + 1):
        for method in methods if rnd % 2 == 0 else methods[::-1]:
            undo = setup_method(unet, method)
            out[method]["trainable"] = count(unet, method)
            t = time.perf_counter()
            train_step(unet, inputs, method)
            sec = time.perf_counter() - t
            undo()
            if rnd:  # round 0 is the warm-up
                times[method].append(sec)
            print(f"# round {rnd} {method}: {sec:.2f} s", file=sys.stderr)
    for method in methods:
        out[method]["step_s"] = statistics.median(times[method])
        out[method]["step_s_all"] = times[method]
    return out


def summary_unet(unet_res: dict) -> dict[str, float]:
    """The UNet ratios of the issue-14 targets (NaN where a method is missing)."""

    def r(a: str, b: str, key: str = "step_s") -> float:
        if a in unet_res and b in unet_res and key in unet_res[a] and key in unet_res[b]:
            return bc.ratio(unet_res[a][key], unet_res[b][key])
        return math.nan

    out = {
        "atoms_vs_loraconv_time": r("atoms", "lora-conv"),
        "atoms_attn_vs_loraattn_time": r("atoms-attn", "lora-attn"),
        "atoms_vs_frozen_time": r("atoms", "frozen"),
        "atoms_attn_vs_frozen_time": r("atoms-attn", "frozen"),
        "atoms_oc_vs_frozen_time": r("atoms-oc", "frozen"),
        "loraconv_vs_frozen_time": r("lora-conv", "frozen"),
        "loraattn_vs_frozen_time": r("lora-attn", "frozen"),
        "atoms_vs_loraconv_peak_mem": r("atoms", "lora-conv", "peak_rise_mib"),
        "atoms_attn_vs_loraattn_peak_mem": r("atoms-attn", "lora-attn", "peak_rise_mib"),
    }
    return out


def summary(unet_res: dict, layers: dict, sample: dict) -> dict[str, float]:
    def r(a: str, b: str, key: str = "step_s") -> float:
        if a in unet_res and b in unet_res and key in unet_res[a] and key in unet_res[b]:
            return bc.ratio(unet_res[a][key], unet_res[b][key])
        return math.nan

    return {
        "atoms_vs_loraconv_time": r("atoms", "lora-conv"),
        "atoms_vs_loraconv_peak_mem": r("atoms", "lora-conv", "peak_rise_mib"),
        "atoms_vs_full_time": r("atoms", "full"),
        "atoms_vs_loraattn_time": r("atoms", "lora-attn"),
        "atoms_vs_frozen_time": r("atoms", "frozen"),
        "atoms_vs_reference_layer_time": layers["atoms_vs_reference_layer_time"],
        "merged_vs_base_sampling": sample["merged_vs_base"],
        "unmerged_vs_base_sampling": sample["unmerged_vs_base"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer methods and reps (< 4 min)")
    ap.add_argument("--smoke", action="store_true", help="the tiny model, seconds (tests)")
    ap.add_argument("--model", default=None, help="model spec (default random:sd15)")
    ap.add_argument("--res", type=int, default=None, help="image side in px (default 128)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: UNet steps only)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--methods", nargs="+", default=None, help="methods to run (default: the set)")
    ap.add_argument("--unet-only", action="store_true", help="the UNet steps only (no layers)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per method")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    picked = [m for arg in args.methods for m in arg.split(",") if m] if args.methods else None
    for m in picked or []:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r} (valid: {', '.join(ALL_METHODS)})")
    if args.res == 512 and not (args.quick or args.smoke) and args.device == "cpu":
        from sdatom.atoms.kernels import tune

        methods = picked or RES512_METHODS
        spec = args.model or "random:sd15"
        unet_res = bench_unet_interleaved(spec, 512, methods, args.reps or 2, methods)
        result: dict[str, Any] = summary_unet(unet_res)
        result.update(
            mode="res512",
            model=spec,
            res=512,
            unet=unet_res,
            kernel_table=tune.table(),
            machine=bc.machine(),
            wall_s=time.perf_counter() - t0,
        )
        if args.json:
            print(bc.dump(result))
            return
        for m, v in unet_res.items():
            print(f"  {m:11s} {v['step_s']:7.3f} s  peak rise {v['peak_rise_mib']:8.0f} MiB")
        for k, v in result.items():
            if isinstance(v, float):
                print(f"{k}: {v:.3f}")
        return
    if args.smoke:
        spec, res, methods, reps, memory = args.model or "tiny", args.res or 32, ALL_METHODS, 2, []
        memory = ["atoms", "lora-conv"]
    elif args.quick:
        spec, res, methods, reps = args.model or "random:sd15", args.res or 128, QUICK_METHODS, 3
        memory = ["atoms", "lora-conv"]
    else:
        spec, res, methods, reps = args.model or "random:sd15", args.res or 128, ALL_METHODS, 5
        memory = ALL_METHODS
    if picked:
        methods, memory = picked, [m for m in memory if m in picked]
    reps = args.reps or reps
    unet_res = bench_unet(
        spec, res, methods, reps, memory, not args.quick, device=args.device, dtype=dtype
    )
    if args.device != "cpu":
        print(bc.dump({"unet": unet_res, "device": torch.cuda.get_device_name(), "res": res}))
        return
    if args.unet_only:  # the UNet set only (no layer or sampling runs)
        from sdatom.atoms.kernels import tune

        out = {**summary_unet(unet_res), "model": spec, "res": res, "unet": unet_res}
        out.update(kernel_table=tune.table(), machine=bc.machine())
        print(bc.dump(out))
        return
    layers = bench_layers.run(
        quick=args.quick, memory=not (args.quick or args.smoke), smoke=args.smoke
    )
    sample = bench_sample.run("tiny", 32, steps=2, reps=3 if args.smoke else 30)
    if not (args.quick or args.smoke):
        extra = bench_sample.run(spec, res, steps=2, reps=5)
    else:
        extra = None
    result: dict[str, Any] = summary(unet_res, layers, sample)
    result.update(
        mode="smoke" if args.smoke else "quick" if args.quick else "full",
        model=spec,
        res=res,
        unet=unet_res,
        layers=layers["cases"],
        sampling=sample,
        sampling_model=extra,
        machine=bc.machine(),
        wall_s=time.perf_counter() - t0,
    )
    if args.json:
        print(bc.dump(result))
        return
    print(f"{spec} at {res} px, batch 1, fp32, {result['machine']['threads']} thread(s)")
    floor = unet_res.get("frozen", {}).get("step_s", math.nan)
    for m, v in unet_res.items():
        print(
            f"  {m:11s} {v['step_s']:7.3f} s  {v['step_s'] / floor:5.2f}x frozen  "
            f"peak rise {v.get('peak_rise_mib', math.nan):8.0f} MiB  trainable {v['trainable']:,}"
        )
    for k, v in result.items():
        if isinstance(v, float):
            print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
