"""GPU checks of issue 10, as ``sdatom train`` runs (one script, about 10 minutes on an H200).

Unlike ``bench_train.py --dtype fp16`` (pure fp16, no autocast: peft then casts LoRA to fp16
while atoms stay fp32), every step here is what ``sdatom train`` does: frozen weights in the
compute dtype, trainable parameters in fp32, the UNet under ``torch.autocast``, a GradScaler
for fp16. Prints one JSON object per line:

  step     random:sd15 512 px training step, batch 1, for frozen / atoms / atoms-attn /
           lora-attn / lora-conv in fp16 and bf16 autocast: median seconds and peak CUDA
           memory rise (MiB, from the allocator) — the table of bench_train.py --res 512
  ratios   per autocast dtype: atoms / lora-conv and atoms-attn / lora-attn (time, peak)
  kernels  the conv/gemm choices the atom layers measured on this GPU (kernels/tune.py)
  grad1x1  one 1x1 atom layer of SD-1.5's shape: its atoms' gradient under fp16/bf16 autocast
           against fp32 (relative error, finite or not)
  sample   merged vs unmerged sampling: bytes held by the atom layers and peak memory of a UNet
           forward (atoms-attn, fp16)
  e2e      20 steps of ``sdatom train --model random:sd15 --resolution 512`` end to end

    bash scripts/bench_gpu.sh > gpu.jsonl
    python scripts/bench_gpu.py --model random:sdxl --res 1024 --only step   # SDXL, once built
    python scripts/bench_gpu.py --smoke     # tiny model on the CPU (bf16 autocast): seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sdatom.atoms import merge_atoms, unmerge_atoms  # noqa: E402
from sdatom.config import TrainConfig  # noqa: E402
from sdatom.methods import get_method  # noqa: E402
from sdatom.models import build_unet  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
METHODS = {
    "frozen": None,
    "atoms": "atoms",
    "atoms-attn": "atoms-attn",
    "lora-attn": None,  # LoRA r=4 on to_q/to_k/to_v/to_out.0 (the TrainConfig default)
    "lora-conv": None,  # LoRA r=4 on the convs that the atoms preset adapts (LoCon-style)
}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_rise_mib(device: torch.device, start: int) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - start) / 2**20, 1)


def prepared_unet(spec: str, method: str, dtype: torch.dtype, device: torch.device):
    """The UNet as train() prepares it: adapter added in fp32, frozen weights cast."""
    from sdatom.atoms import find_targets

    unet = build_unet(spec, device)
    unet.requires_grad_(False)
    lora = {}
    if method == "lora-conv":
        lora["lora_targets"] = tuple(find_targets(unet, "atoms"))
    config = TrainConfig(
        subject="x",
        class_name="y",
        method="lora" if method.startswith("lora") else "atoms",
        preset=METHODS.get(method) or "atoms",
        **lora,
    )
    params = [] if method == "frozen" else get_method(config.method).add(unet, config)
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return unet, params


def train_step(unet, params, inputs, dtype, scaler, device) -> None:
    x = inputs["latent"]
    if not params:
        x = x.clone().requires_grad_(True)  # so that backward runs through the frozen UNet
    t = torch.tensor([500], device=device)
    with torch.autocast(device.type, dtype=dtype):
        out = unet(x, t, encoder_hidden_states=inputs["emb"]).sample
    loss = F.mse_loss(out.float(), inputs["target"])
    (scaler.scale(loss) if scaler is not None else loss).backward()
    for p in params:
        p.grad = None
    sync(device)


def bench_steps(spec: str, res: int, reps: int, device: torch.device) -> None:
    from sdatom.atoms.kernels import tune

    g = torch.Generator().manual_seed(0)
    for dname, dtype in DTYPES.items():
        rows = {}
        for method in METHODS:
            unet, params = prepared_unet(spec, method, dtype, device)
            side = res // 8
            inputs = {
                "latent": torch.randn(1, 4, side, side, generator=g).to(device),
                "emb": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device),
                "target": torch.randn(1, 4, side, side, generator=g).to(device),
            }
            scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
            train_step(unet, params, inputs, dtype, scaler, device)  # warm-up
            start = peak_start(device)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                train_step(unet, params, inputs, dtype, scaler, device)
                times.append(time.perf_counter() - t0)
            rows[method] = {
                "check": "step",
                "model": spec,
                "res": res,
                "autocast": dname,
                "method": method,
                "trainable": sum(p.numel() for p in params),
                "step_s": round(statistics.median(times), 4),
                "peak_rise_mib": peak_rise_mib(device, start),
            }
            emit(rows[method])
            del unet, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
        emit({"check": "ratios", "autocast": dname, **_ratios(rows)})
    emit({"check": "kernels", "table": tune.table()})


def _ratios(rows: dict[str, dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for a, b in (("atoms", "lora-conv"), ("atoms-attn", "lora-attn"), ("atoms", "frozen")):
        for key in ("step_s", "peak_rise_mib"):
            x, y = rows[a][key], rows[b][key]
            out[f"{a}_vs_{b}_{key}"] = round(x / y, 3) if x is not None and y else None
    return out


def grad_1x1(device: torch.device, channels: int, side: int) -> None:
    """SD-1.5's proj_in shape (a 1x1 conv); atoms' gradient under autocast vs fp32."""
    from torch import nn

    from sdatom.atoms import AtomConfig, AtomConv2d

    torch.manual_seed(0)
    layer = AtomConv2d(nn.Conv2d(channels, channels, 1), AtomConfig(), "filter").to(device)
    with torch.no_grad():
        layer.atoms_delta.normal_(0, 0.01)
    x = torch.randn(1, channels, side, side, device=device)
    r = torch.randn(1, channels, side, side, device=device)
    grads = {}
    for name, dtype in (("fp32", None), *DTYPES.items()):
        layer.atoms_delta.grad = None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = layer(x)
        # a loss scaled as GradScaler's default start (65536) would scale it
        ((y.float() * r).sum() * 65536.0).backward()
        grads[name] = layer.atoms_delta.grad.clone()
    for name in DTYPES:
        err = (grads[name] - grads["fp32"]).norm() / grads["fp32"].norm()
        emit(
            {
                "check": "grad1x1",
                "autocast": name,
                "shape": [channels, side, side],
                "finite": bool(torch.isfinite(grads[name]).all()),
                "rel_error": float(err),
                "eps": torch.finfo(DTYPES[name]).eps,
            }
        )


def held_bytes(module: torch.nn.Module) -> int:
    seen = {}
    for m in module.modules():
        tensors = [*m._parameters.values(), *m._buffers.values()]
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@torch.no_grad()
def sample_memory(spec: str, res: int, device: torch.device) -> None:
    unet, _ = prepared_unet(spec, "atoms-attn", torch.float16, device)
    for p in unet.parameters():  # some trained values, so merging changes the weights
        if p.requires_grad:
            p.normal_(0, 1e-3)
    side = res // 8
    x = torch.randn(2, 4, side, side, device=device, dtype=torch.float16)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=torch.float16)
    t = torch.tensor([500], device=device)
    for state in ("unmerged", "merged", "merged-reversible"):
        if state != "unmerged":
            merge_atoms(unet, reversible=state == "merged-reversible")
        start = peak_start(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            unet(x, t, encoder_hidden_states=emb)
        sync(device)
        emit(
            {
                "check": "sample",
                "state": state,
                "res": res,
                "unet_forward_s": round(time.perf_counter() - t0, 4),
                "held_bytes": held_bytes(unet),
                "peak_rise_mib": peak_rise_mib(device, start),
            }
        )
        unmerge_atoms(unet)


def end_to_end(model: str, res: int, steps: int, precision: str, timeout: int) -> None:
    subject = Path(__file__).resolve().parents[1] / "data" / "toy"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "sdatom", "train", "--subject", str(subject),
               "--class-name", "toy", "--model", model, "--resolution", str(res),
               "--steps", str(steps), "--mixed-precision", precision,
               "--num-class-images", "2", "--class-sample-steps", "5",
               "--checkpoint-every", str(max(1, steps // 2)), "--report-to", "none",
               "--output", str(out)]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        summary = {}
        if (out / "train_summary.json").is_file():
            summary = json.loads((out / "train_summary.json").read_text())
        emit(
            {
                "check": "e2e",
                "command": " ".join(cmd[1:]),
                "returncode": done.returncode,
                "wall_s": round(wall, 1),
                "seconds_per_step": summary.get("seconds_per_step"),
                "mixed_precision": summary.get("mixed_precision"),
                "final_loss": summary.get("final_loss"),
                "trainable_params": summary.get("trainable_params"),
                "stderr_tail": done.stderr[-500:] if done.returncode else "",
            }
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds")
    ap.add_argument("--model", default=None, help="model spec (default random:sd15)")
    ap.add_argument("--res", type=int, default=None, help="image side in px (default 512)")
    ap.add_argument("--only", choices=["step"], default=None, help="the step table only")
    args = ap.parse_args()
    if args.smoke:
        device, spec, res, reps = torch.device("cpu"), "tiny", 32, 1
        DTYPES.pop("fp16")  # CPU autocast: bf16
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke)")
        device, reps = torch.device("cuda"), 5
        spec, res = args.model or "random:sd15", args.res or 512
        emit({"check": "machine", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__})
    bench_steps(spec, res, reps, device)
    if args.only == "step":
        return
    grad_1x1(device, 32 if args.smoke else 320, 8 if args.smoke else 64)
    sample_memory(spec, res, device)
    if args.smoke:
        end_to_end("tiny", 32, 2, "no", timeout=300)
    else:
        end_to_end("random:sd15", 512, 20, "fp16", timeout=420)


if __name__ == "__main__":
    main()
