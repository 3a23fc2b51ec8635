"""Method ``lora``: peft LoRA on the attention projections (diffusers' DreamBooth-LoRA)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from sdatom.errors import AdapterError, first_line
from sdatom.fileio import atomic_path
from sdatom.methods.base import ADAPTER_FILE, LayerUpdate, Method, adapter_header

#: diffusers' own file name: ``pipe.load_lora_weights(run_dir)`` finds it without weight_name.
LORA_FILE = "pytorch_lora_weights.safetensors"


class LoraMethod(Method):
    name = "lora"
    default_lr = 1e-4  # diffusers' DreamBooth-LoRA example
    result_name = LORA_FILE

    def result_path(self, run_dir: Path) -> Path:
        # Older runs hold the same diffusers file under the name adapter.safetensors.
        legacy = run_dir / ADAPTER_FILE
        if not (run_dir / LORA_FILE).is_file() and legacy.is_file():
            return legacy
        return run_dir / LORA_FILE

    def add(self, unet, config):
        from peft import LoraConfig

        unet.requires_grad_(False)
        # peft draws the gaussian init from the global RNG: --seed makes it reproducible,
        # without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(config.lora_targets),
                )
            )
        return [p for p in unet.parameters() if p.requires_grad]

    def state_dict(self, unet):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(unet)

    def load_state_dict(self, unet, state):
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(unet, state)

    def save(self, unet: torch.nn.Module, output: Path, config: Any, pipe: Any) -> Path:
        """A diffusers LoRA file (``save_lora_weights``), moved into place atomically."""
        target = output / self.result_name
        tmp_dir = output / ".adapter.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        type(pipe).save_lora_weights(
            tmp_dir, unet_lora_layers=self.state_dict(unet), weight_name=self.result_name
        )
        with atomic_path(target) as tmp:
            shutil.move(tmp_dir / self.result_name, tmp)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return target

    def check_result(self, result: Path) -> None:
        from sdatom.atoms.io import FORMAT, lora_key

        meta, keys = adapter_header(result)
        is_atoms = meta.get("format") == FORMAT
        if is_atoms or not lora_key(keys):
            kind = "an sdatom atoms file" if is_atoms else "not a LoRA file (no lora keys)"
            raise AdapterError(
                f"{result} is {kind} but config.yaml says method: lora; fix 'method' in "
                f"{result.parent / 'config.yaml'} or retrain"
            )

    def apply(self, pipe, result, *, merge, force, spec):
        try:
            pipe.load_lora_weights(str(result.parent), weight_name=result.name)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise AdapterError(
                f"{result} does not load onto {spec} ({first_line(e, 200)}); is it the run's "
                "base model?"
            ) from None
        if merge:
            pipe.fuse_lora()
        return pipe

    def unwrap(self, pipe) -> None:
        pipe.unload_lora_weights()  # after fuse_lora this keeps the fused weights

    @torch.no_grad()
    def dense_updates(self, pipe, base_unet):
        from peft.tuners.lora import LoraLayer

        out = {}
        for name, module in pipe.unet.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                down = module.lora_A[adapter].weight.detach().float()
                up = module.lora_B[adapter].weight.detach().float() * module.scaling[adapter]
                base = module.get_base_layer()
                delta = (up.flatten(1) @ down.flatten(1)).reshape(base.weight.shape)
                if name in out:  # several adapters: their sum, no longer one pair
                    out[name] = LayerUpdate(base, out[name].delta + delta)
                else:
                    out[name] = LayerUpdate(base, delta, factors=(down, up))
        return out
