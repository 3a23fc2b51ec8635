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
    for method in memory:  # forked from this process before it ran any step
        mem = bc.peak_rss_rise(
            lambda m=method: train_step(unet, inputs, m),
            setup=lambda m=method: setup_method(unet, m),  # in the child; it exits after
        )
        out[method].update(mem)
        print(f"# {method}: peak rise {mem['peak_rise_mib']:.0f} MiB", file=sys.stderr)
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
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="instead of the mode's set")
    ap.add_argument(
        "--unet-only", action="store_true", help="the UNet steps only (no layer/sampling ratios)"
    )
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    if args.smoke:
        spec, res, methods, reps, memory = args.model or "tiny", args.res or 32, ALL_METHODS, 2, []
        memory = ["atoms", "lora-conv"]
    elif args.quick:
        spec, res, methods, reps = args.model or "random:sd15", args.res or 128, QUICK_METHODS, 3
        memory = ["atoms", "lora-conv"]
    else:
        spec, res, methods, reps = args.model or "random:sd15", args.res or 128, ALL_METHODS, 5
        memory = ALL_METHODS
    if args.methods:
        methods = args.methods
        memory = [m for m in memory if m in methods]
    unet_res = bench_unet(
        spec, res, methods, reps, memory, not args.quick, device=args.device, dtype=dtype
    )
    if args.device != "cpu" or args.unet_only:
        where = torch.cuda.get_device_name() if args.device != "cpu" else bc.machine()
        ratios = {
            m: {
                "x_frozen": bc.ratio(v["step_s"], unet_res["frozen"]["step_s"])
                if "frozen" in unet_res
                else math.nan,
                "x_lora_attn": bc.ratio(v["step_s"], unet_res["lora-attn"]["step_s"])
                if "lora-attn" in unet_res
                else math.nan,
            }
            for m, v in unet_res.items()
        }
        out = {"model": spec, "unet": unet_res, "ratios": ratios, "device": where, "res": res}
        print(bc.dump({**out, "wall_s": time.perf_counter() - t0}))
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
