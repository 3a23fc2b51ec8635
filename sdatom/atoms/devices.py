"""What a device can compute: Apple's MPS has no float64 (nor complex128)."""

from __future__ import annotations

import torch

#: The device float64 work (decompositions, small solves) runs on when a device lacks it.
HOST = torch.device("cpu")


def supports_float64(device: torch.device | str) -> bool:
    """Whether ``device`` has float64/complex128 kernels (every device but MPS)."""
    return torch.device(device).type != "mps"
