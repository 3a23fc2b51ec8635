"""The interface every training method implements (atoms, lora, full).

A method knows how to put its trainable parameters on a UNet, what a checkpoint stores, how
its trained result is written into a run folder and checked when read back, how that result
goes onto a pipeline, and how it is folded away for export. Nothing outside
``sdatom/methods/`` asks which method a run uses: it asks the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class LayerUpdate:
    """What a trained adapter adds to one UNet layer, as dense float32 tensors.

    ``delta`` has the base weight's shape (``bias`` the bias's, None when unchanged).
    ``factors`` is ``(down, up)`` when the method trained a low-rank pair itself (LoRA):
    ``up @ down`` (reshaped) equals ``delta`` and an export can store it as it is.
    """

    module: torch.nn.Module  # the base layer (its stride/padding/kernel size)
    delta: torch.Tensor
    bias: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None


def adapter_header(result: Path) -> tuple[dict[str, str], list[str]]:
    """A run's adapter file's metadata and keys (AdapterError when it cannot be read)."""
    from sdatom.atoms.io import UNREADABLE, read_safetensors_header
    from sdatom.errors import AdapterError, first_line

    try:
        return read_safetensors_header(result)
    except UNREADABLE as e:
        raise AdapterError(
            f"{result} is not a readable safetensors file ({first_line(e)}): it is truncated "
            "or corrupt"
        ) from None


class Method:
    """One way of tuning a UNet. Subclasses set the class attributes and the hooks."""

    name: str = ""
    default_lr: float = 1e-4
    # True: the base weights are frozen (they may be stored in the compute dtype).
    freezes_base: bool = True
    # Where the trained result lives in a run folder (a file, or a folder for ``full``).
    result_name: str = ADAPTER_FILE

    def check_config(self, config: Any) -> None:
        """Fail on a bad method option before any model is loaded (default: nothing to check)."""

    def preset(self, config: Any) -> str | None:
        """The preset a run summary records (None for methods without presets)."""
        return None

    def result_fingerprint(self, result: Path) -> str | None:
        """The base-model fingerprint the trained result records (None: it records none)."""
        return None

    def add(self, unet: torch.nn.Module, config: Any) -> list[torch.nn.Parameter]:
        """Freeze the UNet, add the method's trainable parameters and return them."""
        raise NotImplementedError

    def state_dict(self, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores (what was trained)."""
        raise NotImplementedError

    def load_state_dict(self, unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Put a checkpoint's tensors back (the inverse of :meth:`state_dict`)."""
        raise NotImplementedError

    def save(self, unet: torch.nn.Module, output: Path, config: Any, pipe: Any) -> Path:
        """Write the trained result into the run folder ``output``; return its path."""
        raise NotImplementedError

    def result_path(self, run_dir: Path) -> Path:
        """Where this method's trained result is in the run folder ``run_dir``."""
        return run_dir / self.result_name

    def is_saved(self, result: Path) -> bool:
        """True when ``result`` (``output / result_name``) holds a complete trained result."""
        return result.is_file()

    def check_result(self, result: Path) -> None:
        """Refuse (AdapterError) a result written by another method or unreadable."""

    def apply(self, pipe: Any, result: Path, *, merge: bool, force: bool, spec: str) -> Any:
        """Load the trained result onto ``pipe`` (merged into the weights when ``merge``)."""
        raise NotImplementedError

    def unwrap(self, pipe: Any) -> None:
        """After a merged :meth:`apply`: leave only plain diffusers modules (for export)."""

    def dense_updates(self, pipe: Any, base_unet: torch.nn.Module) -> dict[str, LayerUpdate]:
        """After an unmerged :meth:`apply`: each changed UNet layer's update, by module name.

        ``base_unet`` is the base model's own UNet (methods whose result replaces weights
        compare against it).
        """
        raise NotImplementedError

    def count(self, params: list[torch.nn.Parameter]) -> int:
        """The number of trainable parameters :meth:`add` returned."""
        return sum(p.numel() for p in params)
