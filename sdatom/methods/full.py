"""Method ``full``: DreamBooth, every UNet weight trained (the baseline with no adapter)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sdatom.errors import AdapterError, first_line
from sdatom.methods.base import LayerUpdate, Method


class FullMethod(Method):
    name = "full"
    default_lr = 5e-6  # diffusers' DreamBooth example
    freezes_base = False
    result_name = "unet"

    def add(self, unet, config):
        unet.requires_grad_(True)
        return list(unet.parameters())

    def state_dict(self, unet):
        return unet.state_dict()

    def load_state_dict(self, unet, state):
        unet.load_state_dict(state)

    def save(self, unet: torch.nn.Module, output: Path, config: Any, pipe: Any) -> Path:
        """A diffusers UNet folder, written beside ``unet/`` and renamed into place."""
        folder = output / self.result_name
        tmp_dir = output / ".unet.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        unet.save_pretrained(tmp_dir, safe_serialization=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp_dir, folder)
        return folder

    def is_saved(self, result: Path) -> bool:
        return (result / "config.json").is_file()

    def apply(self, pipe, result, *, merge, force, spec):
        from diffusers import UNet2DConditionModel

        dtype, device = pipe.unet.dtype, pipe.unet.device
        try:
            unet = UNet2DConditionModel.from_pretrained(result, dtype=dtype)
        except (OSError, ValueError) as e:
            raise AdapterError(
                f"cannot load the fine-tuned UNet in {result} ({first_line(e, 200)})"
            ) from None
        pipe.unet = unet.to(device)
        return pipe

    @torch.no_grad()
    def dense_updates(self, pipe, base_unet):
        """Every Conv2d/Linear whose weight or bias changed (norms and other tensors that
        changed are not layer updates: LoRA-style files cannot hold them)."""
        base = dict(base_unet.named_modules())
        out = {}
        for name, module in pipe.unet.named_modules():
            if not isinstance(module, torch.nn.Conv2d | torch.nn.Linear) or name not in base:
                continue
            w0 = base[name]
            delta = module.weight.detach().float() - w0.weight.detach().float()
            bias = None
            if module.bias is not None and w0.bias is not None:
                bias = module.bias.detach().float() - w0.bias.detach().float()
                bias = bias if bias.any() else None
            if delta.any() or bias is not None:
                out[name] = LayerUpdate(w0, delta, bias)
        return out
