"""Adapter files: safetensors with the atom tensors and self-describing metadata.

A file holds, for every adapted layer ``L``, ``L.atoms_delta`` (and ``L.atoms_beta``,
``L.atoms_sub`` with the overcomplete option) plus ``L.atoms_d0``, the atoms they refer to.
Metadata: ``format`` = "sdatom-atoms", ``format_version``, ``sdatom_version``, ``config``
(AtomConfig as JSON), ``layers`` (JSON: mode, base weight shape, tensor shapes and a probe of
the base weight per layer) and ``base_fingerprint``.

Base-model check: the probe is 64 evenly strided values of each adapted base weight. Loading
compares shapes exactly and probes with a tolerance (rtol 1e-2) so that fp32, fp16 and bf16
copies of one model match: the dtype does NOT matter. ``base_fingerprint`` is a short hash
of the names, shapes and bf16-rounded probes (informational; the check uses the probes).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import sdatom
from sdatom.atoms.config import AtomConfig
from sdatom.atoms.inject import _add, _plan, atom_layers
from sdatom.errors import AdapterError, ConfigError, first_line
from sdatom.fileio import atomic_path

FORMAT = "sdatom-atoms"  # the metadata tag of an atoms file: its one home
# 2: every trainable number is a degree of freedom (linear coder: at most k² filter atoms and
# k_c² channel atoms; 1×1 convs: one atom). Version 1 files are converted on loading.
FORMAT_VERSION = 2
_RESERVED = ("format", "format_version", "sdatom_version", "config", "layers", "base_fingerprint")
_PROBE_SIZE = 64


# ----------------------------------------------------------------------------- state dicts
def atom_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Atom tensors of ``model`` keyed ``<layer>.<tensor>``: trainable ones and D0 (detached)."""
    sd: dict[str, torch.Tensor] = {}
    for name, layer in atom_layers(model).items():
        for pname, param in layer.named_parameters(recurse=False):
            sd[f"{name}.{pname}"] = param.detach()
        sd[f"{name}.atoms_d0"] = layer.atoms_d0.detach()
    return sd


@torch.no_grad()
def load_atom_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Copy atom tensors into the model's atom layers; return the layers loaded.

    A D0 different from the layer's rebuilds its coefficients. ``strict``: missing or
    unexpected keys raise AdapterError; a wrong shape always does.
    """
    layers = atom_layers(model)
    expected = atom_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AdapterError(f"atom state dict does not fit the model: {detail}")
    loaded = []
    for name, layer in layers.items():
        d0 = state_dict.get(f"{name}.atoms_d0")
        if d0 is not None:
            _check_shape(f"{name}.atoms_d0", d0, layer.atoms_d0)
            if not torch.equal(d0.to(layer.atoms_d0), layer.atoms_d0):
                layer.set_atoms(d0)
        got = False
        for pname, param in layer.named_parameters(recurse=False):
            value = state_dict.get(f"{name}.{pname}")
            if value is not None:
                _check_shape(f"{name}.{pname}", value, param)
                param.copy_(value)
                got = True
        if got:
            loaded.append(name)
    return loaded


def _check_shape(key: str, value: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise AdapterError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")


# ----------------------------------------------------------------------------- fingerprints
def _probe(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    # Evenly spaced integer positions (float32 linspace rounds past the end of big weights).
    n, k = flat.numel(), min(flat.numel(), _PROBE_SIZE)
    idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
    vals = flat[idx.to(flat.device)].float()
    return [float(f"{v:.6g}") for v in vals.cpu().tolist()]


def _probe_close(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    ta, tb = torch.tensor(a), torch.tensor(b)
    scale = float(tb.abs().max()) if tb.numel() else 0.0
    return bool(torch.allclose(ta, tb, rtol=1e-2, atol=1e-3 * scale + 1e-12))


def _fingerprint(layers: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for name in sorted(layers):
        probe = torch.tensor(layers[name]["probe"]).to(torch.bfloat16).float().tolist()
        h.update(
            json.dumps([name, layers[name]["weight_shape"], [f"{v:.3e}" for v in probe]]).encode()
        )
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- save
def save_atoms(
    model: nn.Module,
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the model's atoms (trainable tensors + D0) to a safetensors file, atomically.

    ``metadata`` (str → str) is merged into the file's metadata; it may not override the
    reserved keys. ``dtype`` (e.g. torch.float16) casts the tensors; default float32.
    """
    model = _unwrap(model)
    layers = atom_layers(model)
    if not layers:
        raise AdapterError("save_atoms: the model has no atoms (call add_atoms first)")
    configs = {layer.atom_config for layer in layers.values()}
    if len(configs) != 1:
        raise AdapterError("save_atoms: the model's atom layers use different configs")
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"save_atoms metadata: keys and values must be strings ({bad[0]!r})")
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ConfigError(f"save_atoms metadata: {clash[0]!r} is reserved")
    tensors = {
        k: v.to(dtype or torch.float32).cpu().contiguous()
        for k, v in atom_state_dict(model).items()
    }
    info: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        weight = layer.base_layer.weight
        info[name] = {
            "mode": layer.atom_mode,
            "module": type(layer.base_layer).__name__,
            "weight_shape": list(weight.shape),
            "tensors": {
                k.rpartition(".")[2]: list(v.shape)
                for k, v in tensors.items()
                if k.rpartition(".")[0] == name
            },
            "probe": _probe(layer.original_weight()),
        }
    (config,) = configs
    meta = {
        **extra,
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sdatom_version": sdatom.__version__,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps(info, sort_keys=True),
        "base_fingerprint": _fingerprint(info),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


# ----------------------------------------------------------------------------- load
def lora_key(keys: list[str]) -> str | None:
    """The first key that marks a LoRA file (diffusers/peft/kohya naming), or None.

    The one LoRA-file detector: the atoms loader and the run reader both ask it.
    """
    for key in keys:
        if "lora_" in key or ".lora." in key or key.endswith(".alpha"):
            return key
    return None


# What safetensors raises for a file it cannot read (truncated, corrupt, not safetensors).
UNREADABLE = (SafetensorError, OSError, ValueError, RuntimeError)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """The metadata and tensor names of a safetensors file (raises one of ``UNREADABLE``)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {}), list(f.keys())


def _open(path: str | os.PathLike) -> tuple[Path, dict[str, str], list[str]]:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
    try:
        meta, keys = read_safetensors_header(path)
    except UNREADABLE as exc:
        raise AdapterError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {first_line(exc)}"
        ) from None
    if meta.get("format") != FORMAT:
        lora = lora_key(keys)
        if lora:
            raise AdapterError(
                f"{path}: looks like a LoRA file (key {lora!r}), not an sdatom "
                "atoms file; load it with diffusers' load_lora_weights"
            )
        raise AdapterError(f"{path}: not an sdatom atoms file (no format={FORMAT!r} metadata)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        version = -1
    if not 1 <= version <= FORMAT_VERSION:
        raise AdapterError(
            f"{path}: unsupported atoms format version "
            f"{meta.get('format_version')!r} (this sdatom reads "
            f"1..{FORMAT_VERSION})"
        )
    return path, meta, keys


def read_atoms_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an atoms file, with ``config`` and ``layers`` decoded from JSON."""
    path, meta, _ = _open(path)
    out: dict[str, Any] = dict(meta)
    try:
        out["config"] = json.loads(meta["config"])
        out["layers"] = json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: corrupt atoms metadata ({exc})") from None
    return out


def _unwrap(target: Any) -> nn.Module:
    unet = getattr(target, "unet", None)
    model = unet if isinstance(unet, nn.Module) else target
    if not isinstance(model, nn.Module):
        raise AdapterError(
            f"expected a torch module or a pipeline with .unet, got {type(target).__name__}"
        )
    return model


def _read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(
            f"{path}: cannot read its tensors (truncated or corrupt?): {first_line(exc)}"
        ) from None


def load_atoms(
    target: Any,
    path: str | os.PathLike,
    force: bool = False,
    *,
    scale: float = 1.0,
    cache_dir: Any = None,
) -> list[str]:
    """Rebuild the atoms stored in ``path`` on a model (or a pipeline's ``.unet``) and load them.

    Refuses (AdapterError, one line naming the file) a file that is not an sdatom atoms file,
    a truncated or corrupt one, and one whose layers or base weights do not match the model.
    ``force=True`` warns instead and loads every layer whose shape matches, including those
    whose base weights differ (e.g. a fine-tuned variant of the base model); layers missing
    or of another shape are skipped, and none loadable at all is still an error.
    A model that already has the same atom layers just gets their values. ``scale``
    multiplies the update (like a LoRA weight: 0 is the base model, 1 the trained one); the
    update is linear in ΔD and D1, so those are scaled. Returns the names of the layers loaded.
    """
    model = _unwrap(target)
    meta = read_atoms_metadata(path)
    path = Path(path)
    try:
        config = AtomConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise AdapterError(f"{path}: invalid atom config in metadata ({exc})") from None
    stored: dict[str, dict[str, Any]] = meta["layers"]
    existing = atom_layers(model)
    if existing:
        candidates = {
            n: (layer.atom_mode, layer.base_layer, layer) for n, layer in existing.items()
        }
    else:
        plan, _ = _plan(model, config)
        candidates = {n: (mode, module, None) for n, mode, module in plan}
    problems: list[str] = []
    weight_problems: list[str] = []
    good: list[str] = []
    other_weights: list[str] = []  # same shape, different base weights: loaded with force
    for name, info in stored.items():
        if name not in candidates:
            problems.append(f"layer {name!r} not in the model")
            continue
        mode, module, layer = candidates[name]
        shape = list(module.weight.shape)
        weight = layer.original_weight() if layer is not None else module.weight
        if shape != info["weight_shape"] or mode != info["mode"]:
            problems.append(f"{name!r} has shape {shape}, file has {info['weight_shape']}")
        elif not _probe_close(_probe(weight), info["probe"]):
            weight_problems.append(f"{name!r} has different base weights (fingerprint mismatch)")
            other_weights.append(name)
        else:
            good.append(name)
    extra = [n for n in candidates if n not in stored]
    problems += [f"model layer {n!r} not in the file" for n in extra]
    problems += weight_problems  # structural problems first: they say more
    if problems:
        msg = (
            f"{path}: does not match this base model ({len(problems)} problems, e.g. {problems[0]})"
        )
        if not force:
            raise AdapterError(msg + "; pass force=True (sdatom sample --force) to load it anyway")
        good += other_weights
        if not good:
            raise AdapterError(msg + "; no layer matches, nothing to load")
        warnings.warn(msg + f"; forced: loading {len(good)} layers of matching shape", stacklevel=2)
    if existing and extra:
        raise AdapterError(
            f"{path}: the model already has other atom layers; call remove_atoms first"
        )
    if not existing:
        _add(model, config, good, cache_dir)
    keys = [f"{n}.{t}" for n in good for t in stored[n]["tensors"]]
    _, _, file_keys = _open(path)
    absent = [k for k in keys if k not in file_keys]
    if absent:
        raise AdapterError(f"{path}: corrupt atoms file, tensor {absent[0]!r} is missing")
    tensors = _read_tensors(path, keys)
    if int(meta["format_version"]) < 2:
        tensors = _from_format_1(path, config, tensors, atom_state_dict(model))
    if scale != 1.0:
        tensors = {
            k: v * scale if k.endswith((".atoms_delta", ".atoms_sub")) else v
            for k, v in tensors.items()
        }
    loaded = load_atom_state_dict(model, tensors, strict=not problems)
    return loaded


@torch.no_grad()
def _from_format_1(
    path: Path,
    config: AtomConfig,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Convert a format-1 file, exactly: its linear-coder layers stored more atoms than
    degrees of freedom (9 scalar atoms on a 1×1 conv, 64 channel atoms of 16 entries) and
    used only M = pinv(D0)·ΔD; the new layout stores the complete basis D0[:d] and
    ΔD' = D0[:d]·M, which gives the same M. Lasso and overcomplete layers that changed shape
    cannot be converted: refused in one line."""
    out = dict(tensors)
    for key, want in expected.items():
        if not key.endswith(".atoms_delta") or key not in tensors:
            continue
        layer = key[: -len(".atoms_delta")]
        delta, d0 = tensors[key], tensors.get(f"{layer}.atoms_d0")
        if tuple(delta.shape) == tuple(want.shape):
            continue
        convertible = (
            config.coder == "linear"
            and d0 is not None
            and f"{layer}.atoms_beta" not in tensors
            and delta.shape[1] == want.shape[1]
        )
        if convertible:
            mix = torch.linalg.pinv(d0.double()) @ delta.double()  # (d, d): what reached W
            basis = d0.double()[: want.shape[0]]
            new = basis @ mix
            convertible = torch.allclose(torch.linalg.pinv(basis) @ new, mix, atol=1e-9)
        if not convertible:
            raise AdapterError(
                f"{path}: saved in sdatom's format 1, where {layer!r} has {delta.shape[0]} atoms "
                f"and this sdatom trains {want.shape[0]}; this layer cannot be converted: sample "
                "or export it (sdatom export --merged) with sdatom 0.1, or train it again"
            )
        out[key] = new.to(delta.dtype)
        out[f"{layer}.atoms_d0"] = basis.to(d0.dtype).contiguous()
    return out
