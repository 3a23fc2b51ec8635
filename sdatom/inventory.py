"""The UNet's layer inventory: what ``sdatom inspect`` prints."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

# Linear layers by the role their name gives them in a diffusers UNet.
_LINEAR_ROLES = (
    ("attention q/k/v/out", (".to_q", ".to_k", ".to_v", ".to_out.0")),
    ("feed-forward", (".ff.net.0.proj", ".ff.net.2")),
    ("time embedding", ("time_embedding.linear_1", "time_embedding.linear_2", ".time_emb_proj")),
    ("projections", (".proj_in", ".proj_out")),
)


def linear_role(name: str) -> str:
    """The role of a Linear layer named ``name`` in a diffusers UNet."""
    for role, suffixes in _LINEAR_ROLES:
        if any(name.endswith(s) or name == s.lstrip(".") for s in suffixes):
            return role
    return "other linear"


def layer_group(name: str, module: nn.Module) -> str | None:
    """The inventory group of a module, or None for modules that are not counted."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d {kh}x{kw}"
    if isinstance(module, nn.Linear):
        return f"Linear: {linear_role(name)}"
    return None


def unet_inventory(unet: nn.Module) -> dict[str, Any]:
    """Layer counts and parameters grouped by kind, plus the UNet's total parameter count.

    Works on a UNet built on the ``meta`` device, so no weights are needed.
    """
    groups: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for name, module in unet.named_modules():
        group = layer_group(name, module)
        if group is None:
            continue
        entry = groups.setdefault(group, {"group": group, "layers": 0, "params": 0})
        entry["layers"] += 1
        entry["params"] += sum(p.numel() for p in module.parameters(recurse=False))
    ordered = sorted(groups.values(), key=lambda g: (not g["group"].startswith("Conv"), g["group"]))
    return {"unet_params": sum(p.numel() for p in unet.parameters()), "groups": ordered}
