"""``sdatom inspect``: a model's UNet inventory (layer counts and parameters by kind) and a
preset's trainable parameters.

Only the UNet's config is read: the UNet is built on the ``meta`` device, so inspecting
SD-1.5 needs no weights and no memory.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdatom.errors import ModelLoadError, first_line
from sdatom.models import (
    ARCHITECTURES,
    CHECKPOINT_SUFFIXES,
    build_unet,
    check_folder,
    default_model,
    hub_offline,
)

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


def meta_unet(spec: str | None):
    """The UNet of ``spec`` on the meta device (built specs, diffusers folders, cached hub ids)."""
    from diffusers import UNet2DConditionModel

    spec = spec or default_model()
    if spec in ARCHITECTURES:
        return build_unet(spec, "meta")
    source = Path(spec)
    if source.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(
            f"inspect reads a UNet config: give the diffusers folder or hub id, not {spec}"
        )
    if source.exists():
        check_folder(source)
    try:
        config = UNet2DConditionModel.load_config(
            spec, subfolder="unet", local_files_only=source.exists() or hub_offline()
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot read the UNet config of {spec!r} "
            f"({'offline, not in the local cache' if hub_offline() else first_line(e)}): "
            "pass --model PATH (a diffusers folder) or --model tiny"
        )
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def inspect_model(spec: str | None, preset: str | None = None) -> dict[str, Any]:
    """The inventory of ``spec``'s UNet, with a preset's trainable counts when one is given."""
    unet = meta_unet(spec)
    report: dict[str, Any] = {"model": spec or default_model(), **unet_inventory(unet)}
    if preset is not None:
        report.update(preset_report(unet, preset))
    return report


def preset_report(unet: torch.nn.Module, preset: str) -> dict[str, Any]:
    """Trainable parameters of an atom preset (or YAML atom config) per layer group and total."""
    from sdatom.atoms import AtomConfig, count_trainable

    spec: Any = preset
    if preset.endswith((".yaml", ".yml")):
        if not Path(preset).is_file():
            raise ModelLoadError(f"--preset {preset}: no such atom config file")
        spec = AtomConfig.from_yaml(preset)
    counts = count_trainable(unet, spec)
    groups: dict[str, dict[str, Any]] = {}
    for name, layer in counts["layers"].items():
        module = unet.get_submodule(name)
        group = layer_group(name, module) or type(module).__name__
        entry = groups.setdefault(group, {"group": group, "layers": 0, "trainable": 0})
        entry["layers"] += 1
        entry["trainable"] += layer["trainable"]
    return {
        "preset": preset,
        "trainable_params": counts["trainable_params"],
        "trainable_groups": sorted(groups.values(), key=lambda g: g["group"]),
        "adapter_bytes": {"fp32": counts["fp32_bytes"], "fp16": counts["fp16_bytes"]},
    }


def format_inspection(report: dict[str, Any]) -> str:
    """A plain-text table of an inspection report."""
    lines = [f"model: {report['model']}", ""]
    lines.append(f"{'layer group':<32}{'layers':>8}{'params':>16}")
    for g in report["groups"]:
        lines.append(f"{g['group']:<32}{g['layers']:>8}{g['params']:>16,}")
    lines.append(f"{'UNet total':<32}{'':>8}{report['unet_params']:>16,}")
    if "trainable_params" in report:
        lines += ["", f"preset {report['preset']}:"]
        for g in report.get("trainable_groups", []):
            lines.append(f"  {g['group']:<30}{g['layers']:>8}{g['trainable']:>16,}")
        lines.append(f"  {'trainable total':<30}{'':>8}{report['trainable_params']:>16,}")
        sizes = report.get("adapter_bytes", {})
        if sizes:
            lines.append(
                "  adapter file: " + ", ".join(f"{k} {v / 1024:,.1f} KiB" for k, v in sizes.items())
            )
    return "\n".join(lines)
