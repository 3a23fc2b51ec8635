"""Find target layers, wrap them with atoms, merge/unmerge/remove/disable, count parameters."""

from __future__ import annotations

import contextlib
import re
import warnings
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from sdatom.atoms.config import AtomConfig, Patterns, resolve_config
from sdatom.atoms.layer import PREFIX, AtomConv2d, AtomLayer, AtomLinear, atom_shapes
from sdatom.errors import AdapterError, NoTargetsMatchedError

ConfigSpec = AtomConfig | str | Mapping[str, Any] | None


def matches(name: str, patterns: Patterns) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list entry matches
    an exact name or a dotted suffix (``"to_q"`` matches ``"attn1.to_q"``)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _plan(
    model: nn.Module, config: AtomConfig
) -> tuple[list[tuple[str, str, nn.Module]], list[tuple[str, str]]]:
    """(name, mode, module) of every layer to adapt, and (name, reason) of skipped ones."""
    plan: list[tuple[str, str, nn.Module]] = []
    skipped: list[tuple[str, str]] = []
    inside_atoms: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, AtomLayer):
            inside_atoms.append(name + ".")
        if not name or any(name.startswith(p) for p in inside_atoms):
            continue
        if matches(name, config.exclude_modules):
            continue
        is_conv, is_linear = isinstance(module, nn.Conv2d), isinstance(module, nn.Linear)
        if not (is_conv or is_linear):
            continue
        mode = None
        if matches(name, config.channel_modules):
            mode = "channel"
        elif config.target_modules is None:
            mode = "filter" if is_conv else None
        elif matches(name, config.target_modules):
            mode = "filter" if is_conv else "channel"
        if mode is None:
            continue
        try:
            atom_shapes(module, config, mode)
        except ValueError as exc:
            skipped.append((name, str(exc)))
            continue
        plan.append((name, mode, module))
    return plan, skipped


def _no_match_error(
    model: nn.Module, config: AtomConfig, skipped: list[tuple[str, str]]
) -> NoTargetsMatchedError:
    names = [n for n, _ in model.named_modules() if n][:8]
    why = f"; skipped: {skipped[0][0]} ({skipped[0][1]})" if skipped else ""
    return NoTargetsMatchedError(
        f"atoms: no layer matched target_modules={config.target_modules!r}, "
        f"channel_modules={config.channel_modules!r}, exclude_modules="
        f"{config.exclude_modules!r}{why}; some module names: {', '.join(names)}"
    )


def find_targets(model: nn.Module, config: ConfigSpec = None) -> list[str]:
    """Names of the layers ``add_atoms`` would adapt (raises NoTargetsMatchedError if none)."""
    cfg = resolve_config(config)
    plan, skipped = _plan(model, cfg)
    if not plan:
        raise _no_match_error(model, cfg, skipped)
    return [name for name, _, _ in plan]


def atom_layers(model: nn.Module) -> dict[str, AtomLayer]:
    """The atom wrappers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AtomLayer)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _add(model: nn.Module, cfg: AtomConfig, names: list[str] | None, cache_dir: Any) -> list[str]:
    if atom_layers(model):
        raise AdapterError("model already has atoms; call remove_atoms first")
    plan, skipped = _plan(model, cfg)
    if names is not None:
        keep = set(names)
        plan = [p for p in plan if p[0] in keep]
    if not plan:
        raise _no_match_error(model, cfg, skipped)
    for name, reason in skipped:
        warnings.warn(f"atoms: skipping {name}: {reason}", stacklevel=3)
    for name, mode, module in plan:
        cls = AtomLinear if isinstance(module, nn.Linear) else AtomConv2d
        seed = cfg.seed ^ zlib.crc32(name.encode())
        _replace(model, name, cls(module, cfg, mode, name=name, cache_dir=cache_dir, seed=seed))
    for pname, param in model.named_parameters():
        param.requires_grad_(pname.rpartition(".")[2].startswith(PREFIX))
    return [name for name, _, _ in plan]


def add_atoms(model: nn.Module, config: ConfigSpec = None, *, cache_dir: Any = None) -> list[str]:
    """Wrap the matched layers of ``model`` with atoms, in place; return their names.

    ``config`` is an AtomConfig, a preset name, a dict, or None (the ``atoms`` preset).
    Every non-atom parameter is frozen. At this point the model computes exactly what it
    computed before (the atom updates start at zero). ``cache_dir`` is the lasso cache
    (default ``<sdatom cache>/lasso``). Works on a meta-device model (no decomposition).
    """
    return _add(model, resolve_config(config), None, cache_dir)


def remove_atoms(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the original layers back (after merging the atoms into them if ``merge``)."""
    for name, layer in atom_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    return model


def merge_atoms(model: nn.Module, safe: bool = False, reversible: bool = False) -> list[str]:
    """Fold every atom update into its base weight; ``safe`` checks finiteness first.

    No weight-sized tensor is kept; ``reversible=True`` keeps a CPU copy of each linear-coder
    base weight so that ``unmerge_atoms`` restores it bit for bit (see AtomLayer.merge).
    """
    layers = atom_layers(model)
    for layer in layers.values():
        layer.merge(safe=safe, reversible=reversible)
    return list(layers)


def unmerge_atoms(model: nn.Module) -> list[str]:
    """Undo ``merge_atoms`` (in reverse order); base weights come back up to rounding
    (bit for bit after a reversible merge)."""
    layers = atom_layers(model)
    for layer in reversed(list(layers.values())):
        layer.unmerge()
    return list(layers)


def set_atoms_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every atom layer on or off (off = the base model's output)."""
    for layer in atom_layers(model).values():
        layer.disabled = not enabled


@contextlib.contextmanager
def disable_atoms(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes its base output."""
    layers = atom_layers(model)
    before = {name: layer.disabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.disabled = before[name]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The atom parameters of ``model`` (what an optimizer should receive)."""
    return [
        p
        for layer in atom_layers(model).values()
        for n, p in layer.named_parameters(recurse=False)
        if n.startswith(PREFIX)
    ]


def _group(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def count_trainable(model: nn.Module, config: ConfigSpec = None) -> dict[str, Any]:
    """Count what ``add_atoms(model, config)`` would train, without changing ``model``.

    Needs only shapes, so a meta-device model works. Returns ``trainable_params``,
    ``stored_params`` (trainable + the D0 atoms saved with them), ``fp32_bytes`` /
    ``fp16_bytes`` (adapter file size without its header), ``layers`` (per layer: mode,
    weight shape, trainable, stored) and ``groups`` (the same sums per top-level block).
    """
    cfg = resolve_config(config)
    plan, skipped = _plan(model, cfg)
    if not plan:
        raise _no_match_error(model, cfg, skipped)
    layers: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, int]] = {}
    for name, mode, module in plan:
        shapes = atom_shapes(module, cfg, mode)
        sizes = {k: _numel(s) for k, s in shapes.items()}
        trainable = sum(v for k, v in sizes.items() if k != "atoms_d0")
        stored = sum(sizes.values())
        layers[name] = {
            "mode": mode,
            "weight_shape": list(module.weight.shape),
            "trainable": trainable,
            "stored": stored,
        }
        g = groups.setdefault(_group(name), {"layers": 0, "trainable": 0, "stored": 0})
        g["layers"] += 1
        g["trainable"] += trainable
        g["stored"] += stored
    for g in groups.values():
        g["fp32_bytes"], g["fp16_bytes"] = 4 * g["stored"], 2 * g["stored"]
    stored_total = sum(v["stored"] for v in layers.values())
    return {
        "trainable_params": sum(v["trainable"] for v in layers.values()),
        "stored_params": stored_total,
        "fp32_bytes": 4 * stored_total,
        "fp16_bytes": 2 * stored_total,
        "layers": layers,
        "groups": groups,
        "skipped": dict(skipped),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fit_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per adapted layer: ``rel_error`` ‖R − αD0‖/‖R‖ of the decomposition and ``sparsity``
    (fraction of zero coefficients; about 0 for the linear coder)."""
    return {name: layer.fit_report() for name, layer in atom_layers(model).items()}
