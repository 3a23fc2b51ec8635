"""Adapter file sizes on the SD-1.5 UNet (random weights): atoms presets vs LoRA vs full UNet.

atoms presets   save_atoms(unet, path) (fp32 and fp16), real files on disk
lora-attn r=4   peft inject on to_q/to_k/to_v/to_out.0, get_peft_model_state_dict,
                safetensors.torch.save_file, real file on disk
full UNet       tensor bytes of the state dict (fp32, fp16): a safetensors file is that plus
                a JSON header of some tens of KB (not written: 3.4 GB of disk for a number)

  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_files.py [--model random:sd15]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402

from sdatom.atoms import add_atoms, atom_state_dict, remove_atoms, save_atoms  # noqa: E402
from sdatom.models import build_unet  # noqa: E402

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def run(spec: str = "random:sd15") -> dict:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    unet = build_unet(spec)
    out: dict = {"model": spec, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("atoms", "atoms-attn", "atoms-oc"):
            add_atoms(unet, preset)
            n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
            for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
                path = Path(tmp) / f"{preset}-{name}.safetensors"
                how = "save_atoms"
                try:
                    save_atoms(unet, path, dtype=dtype)
                except IndexError:  # io._probe on >2^24-element weights (reported to the lead)
                    how = "atom_state_dict + save_file (save_atoms raised IndexError)"
                    sd = {k: v.to(dtype).contiguous() for k, v in atom_state_dict(unet).items()}
                    save_file(sd, str(path))
                out["files"][f"{preset} ({name})"] = {
                    "bytes": path.stat().st_size,
                    "trainable": n,
                    "how": how,
                }
            remove_atoms(unet)
        lora = LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION)
        inject_adapter_in_model(lora, unet)
        sd = get_peft_model_state_dict(unet)
        n = sum(v.numel() for v in sd.values())
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            path = Path(tmp) / f"lora-{name}.safetensors"
            save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path))
            out["files"][f"lora-attn r4 ({name})"] = {"bytes": path.stat().st_size, "trainable": n}
    base = build_unet(spec, device="meta")
    numel = sum(t.numel() for t in base.state_dict().values())
    out["files"]["full UNet (fp32, tensor bytes)"] = {"bytes": numel * 4, "trainable": numel}
    out["files"]["full UNet (fp16, tensor bytes)"] = {"bytes": numel * 2, "trainable": numel}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:sd15")
    args = ap.parse_args()
    out = run(args.model)
    out["machine"] = bc.machine()
    print(bc.dump(out))
    for name, v in out["files"].items():
        print(f"{name:34s} {v['bytes']:>14,d} B  trainable {v['trainable']:>12,d}", file=sys.stderr)


if __name__ == "__main__":
    main()
