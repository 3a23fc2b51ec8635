"""Method ``atoms``: filter atoms (sdatom's own method, ``sdatom.atoms``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdatom.errors import AdapterError
from sdatom.methods.base import LayerUpdate, Method, adapter_header


def _atom_spec(config: Any) -> Any:
    return config.atoms if config.atoms is not None else config.preset


class AtomsMethod(Method):
    name = "atoms"
    default_lr = 1e-4  # the LoCA benchmark's setting

    def check_config(self, config: Any) -> None:
        from sdatom.atoms import resolve_config

        resolve_config(_atom_spec(config))

    def preset(self, config: Any) -> str | None:
        return config.preset

    def result_fingerprint(self, result):
        from sdatom.atoms import read_atoms_metadata

        return str(read_atoms_metadata(result).get("base_fingerprint", ""))

    def add(self, unet, config):
        from sdatom.atoms import add_atoms, trainable_parameters

        unet.requires_grad_(False)
        add_atoms(unet, _atom_spec(config))
        return trainable_parameters(unet)

    def state_dict(self, unet):
        from sdatom.atoms import atom_state_dict

        return atom_state_dict(unet)

    def load_state_dict(self, unet, state):
        from sdatom.atoms import load_atom_state_dict

        load_atom_state_dict(unet, state)

    def save(self, unet: torch.nn.Module, output: Path, config: Any, pipe: Any) -> Path:
        from sdatom.atoms import save_atoms

        meta = {
            "model": config.model,
            "method": self.name,
            "token": config.token,
            "class_name": config.class_name,
        }
        return save_atoms(unet, output / self.result_name, metadata=meta)

    def check_result(self, result: Path) -> None:
        from sdatom.atoms.io import FORMAT, lora_key

        meta, keys = adapter_header(result)
        if meta.get("format") != FORMAT:
            kind = "a LoRA file" if lora_key(keys) else "not an sdatom atoms file"
            raise AdapterError(
                f"{result} is {kind} but config.yaml says method: atoms; fix 'method' in "
                f"{result.parent / 'config.yaml'} or retrain"
            )

    def apply(self, pipe, result, *, merge, force, spec):
        from sdatom.atoms import load_atoms, merge_atoms

        load_atoms(pipe.unet, result, force=force)
        if merge:
            merge_atoms(pipe.unet)
        return pipe

    def unwrap(self, pipe) -> None:
        from sdatom.atoms import remove_atoms

        # merge=True keeps the (already merged) weights; the default would unmerge them.
        remove_atoms(pipe.unet, merge=True)

    @torch.no_grad()
    def dense_updates(self, pipe, base_unet):
        from sdatom.atoms import AtomLayer

        return {
            name: LayerUpdate(layer.base_layer, layer.get_delta_weight().detach().float())
            for name, layer in pipe.unet.named_modules()
            if isinstance(layer, AtomLayer)
        }
