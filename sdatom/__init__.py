"""sdatom: personalize Stable Diffusion by tuning filter atoms.

The public API, for use in your own diffusers code::

    import sdatom
    sdatom.add_atoms(pipe.unet, "atoms-attn")      # decompose convs + attention, freeze the rest
    ...train sdatom.trainable_parameters(pipe.unet)...
    sdatom.save_atoms(pipe.unet, "adapter.safetensors")
    sdatom.load_atoms(other_pipe, "adapter.safetensors"); sdatom.merge_atoms(other_pipe.unet)
    sdatom.load_atoms(pipe3, "adapter.safetensors", scale=0.5)  # half the update (a LoRA weight)

Names are imported on first use, so ``import sdatom`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "AtomConfig": "sdatom.atoms",
    "PRESETS": "sdatom.atoms",
    "add_atoms": "sdatom.atoms",
    "remove_atoms": "sdatom.atoms",
    "merge_atoms": "sdatom.atoms",
    "unmerge_atoms": "sdatom.atoms",
    "save_atoms": "sdatom.atoms",
    "load_atoms": "sdatom.atoms",
    "find_targets": "sdatom.atoms",
    "trainable_parameters": "sdatom.atoms",
    "TrainConfig": "sdatom.config",
    "train": "sdatom.train",
    "sample": "sdatom.sample",
    "evaluate": "sdatom.eval",
    "load_pipeline": "sdatom.models",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sdatom' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
