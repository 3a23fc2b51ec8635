"""Small adapter files for tools without sdatom: kohya/LoCon LoRA files and LyCORIS full diffs.

No standard format holds the atoms' update compactly (it is the base weight's taps mixed by a
small matrix, so it depends on W0). Two honest options that ComfyUI, AUTOMATIC1111/Forge,
kohya and (for LoRA) diffusers all read:

- :func:`export_lora`: per layer, the dense update ΔW reshaped to (c_out, c_in·k²), truncated
  SVD, ``up @ down``. The rank is fixed (``rank``) or the smallest that meets a relative
  Frobenius error (``max_error``, default 1 %), and capped where a low-rank pair would be no
  smaller than the dense layer; such a layer is then stored as a full diff (``dense="diff"``),
  refused (``"error"``) or kept as a pair anyway (``"lora"``: the file stays loadable by
  diffusers, which reads only LoRA keys). One ``alpha`` for the file, its most common rank
  (alpha = rank on those layers; the others fold r/alpha into ``up``).
- :func:`export_diff`: the exact update as LyCORIS "full" keys ``<name>.diff`` / ``.diff_b``.

Key names follow kohya (``lora_unet_<module path with . -> _>``); which module path (diffusers
or LDM) is the family's rule (:meth:`sdatom.families.Family.kohya_unet_name`). Both files carry
the metadata A1111 and Forge read (``ss_*``, ``sshs_model_hash``, ``modelspec.*``) and sdatom's
own (``sdatom_*``). diffusers' ``lora_adapter_metadata`` is never written: its peft path
raises on a kohya file with ``.alpha`` tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdatom.errors import UsageError
from sdatom.fileio import atomic_path
from sdatom.methods import get_method
from sdatom.methods.base import LayerUpdate
from sdatom.runs import Run, as_run, load_run_pipeline

__all__ = [
    "DENSE_CHOICES",
    "DEFAULT_MAX_ERROR",
    "FileReport",
    "LayerReport",
    "export_diff",
    "export_lora",
    "low_rank",
    "kohya_state_dict",
]

DENSE_CHOICES = ("diff", "error", "lora")
DEFAULT_MAX_ERROR = 0.01
Echo = Callable[[str], None]


@dataclass(frozen=True)
class LayerReport:
    """One exported layer: its module and key names, rank (None: stored dense) and the
    relative Frobenius error ‖ΔW − stored‖/‖ΔW‖ of what the file holds (fp16 included)."""

    module: str
    key: str
    shape: tuple[int, ...]
    rank: int | None
    error: float


@dataclass
class FileReport:
    """What :func:`export_lora` / :func:`export_diff` wrote and how close it is."""

    path: Path
    kind: str  # "lora" or "diff"
    bytes: int
    layers: list[LayerReport]
    image_diff: dict[str, float] | None = None
    card: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dense(self) -> list[str]:
        """Modules stored as full diffs (no low-rank pair)."""
        return [r.module for r in self.layers if r.rank is None]

    @property
    def worst(self) -> LayerReport:
        return max(self.layers, key=lambda r: r.error)

    @property
    def median_error(self) -> float:
        errors = sorted(r.error for r in self.layers)
        return errors[len(errors) // 2] if errors else 0.0

    def lines(self) -> list[str]:
        """The report the CLI prints."""
        out = [f"wrote {self.path} ({_size(self.bytes)}, {len(self.layers)} layers)"]
        if self.layers:
            ranks = [r.rank for r in self.layers if r.rank is not None]
            if ranks:
                out.append(f"ranks: {min(ranks)}..{max(ranks)} ({len(ranks)} low-rank layers)")
            w = self.worst
            out.append(
                f"layer error (relative Frobenius): worst {w.error:.2e} ({w.module}), "
                f"median {self.median_error:.2e}"
            )
        if self.image_diff:
            d = self.image_diff
            out.append(
                f"images vs the exact adapter ({int(d['images'])} fixed-seed samples, "
                f"{int(d['steps'])} steps, pixels in [0, 1]): mean |diff| {d['mean_abs']:.2e}, "
                f"max |diff| {d['max_abs']:.2e}"
            )
        out += self.notes
        if self.card is not None:
            out.append(f"model card: {self.card}")
        return out


# ----------------------------------------------------------------------------- low rank


def dense_limit(c_out: int, n: int) -> int:
    """The largest rank whose pair (r·(c_out + n) numbers) is smaller than the dense layer."""
    return max(0, (c_out * n - 1) // (c_out + n))


@torch.no_grad()
def low_rank(
    mat: torch.Tensor, *, rank: int | None = None, max_error: float = DEFAULT_MAX_ERROR
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(up, down, r)`` with ``up @ down`` the best rank-``r`` approximation of ``mat``.

    ``rank`` fixes r (clamped to the matrix's size); otherwise r is the smallest rank whose
    relative Frobenius error is at most ``max_error``. The singular values are split evenly
    between the factors (√S each) so that both stay in fp16's range.
    """
    u, s, vh = torch.linalg.svd(mat.float(), full_matrices=False)
    full = s.numel()
    if rank is None:
        energy = s.double() ** 2
        total = float(energy.sum())
        # tail[r] = energy beyond the first r singular values
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).tolist() + [0.0]
        bound = (max_error**2) * total
        rank = next((r for r in range(full + 1) if tail[r] <= bound), full)
        rank = max(rank, 1)
    r = max(1, min(int(rank), full))
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], r


def _pair_shapes(module: torch.nn.Module, up: torch.Tensor, down: torch.Tensor):
    w = module.weight
    if w.dim() == 4:  # LoCon: down carries the kernel (and the layer's stride/padding)
        return up.reshape(w.shape[0], -1, 1, 1), down.reshape(-1, *w.shape[1:])
    return up.reshape(w.shape[0], -1), down.reshape(-1, w.shape[1])


def _rel_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(delta.norm())
    return float((delta - approx).norm()) / norm if norm else 0.0


@dataclass
class _Layer:
    module: str
    key: str
    update: LayerUpdate
    tensors: dict[str, torch.Tensor]
    rank: int | None
    approx: torch.Tensor  # what the file adds to the weight, in float32
    approx_bias: torch.Tensor | None = None
    pair: tuple[torch.Tensor, torch.Tensor] | None = None  # (up, down) in float32


def _encode(
    name: str,
    key: str,
    update: LayerUpdate,
    *,
    rank: int | None,
    max_error: float,
    dense: str,
    dtype: torch.dtype,
) -> _Layer:
    module, delta = update.module, update.delta
    if getattr(module, "groups", 1) != 1:
        raise UsageError(f"--lora: {name} is a grouped convolution; export it with --diff")
    c_out = delta.shape[0]
    mat = delta.reshape(c_out, -1)
    limit = dense_limit(c_out, mat.shape[1])
    native = update.factors
    if native is not None and (rank is None or rank >= native[0].shape[0]):
        down, up = native  # the method's own pair (LoRA): exact, rank unchanged
        r = down.shape[0]
        up, down = up.reshape(c_out, r), down.reshape(r, -1)
    else:
        up, down, r = low_rank(mat, rank=rank, max_error=max_error)
        if r > limit and native is None:
            if dense == "error":
                raise UsageError(
                    f"--lora: {name} needs rank {r} (a pair of {r * sum(mat.shape):,} numbers), "
                    f"no smaller than the layer ({mat.numel():,}); pass a larger --max-error or "
                    "a smaller --rank, or --dense diff / --dense lora to store it anyway"
                )
            if dense == "diff":
                return _dense(name, key, update, dtype)
    up_t, down_t = _pair_shapes(module, up.contiguous(), down.contiguous())
    return _Layer(name, key, update, {}, r, torch.empty(0), pair=(up_t, down_t))


def _finish(layer: _Layer, alpha: int, dtype: torch.dtype) -> None:
    """Store a low-rank layer's pair with the file's ``alpha``: kohya's update is
    alpha/r · up·down, so r/alpha is folded into ``up`` (1 where alpha = r)."""
    up, down = layer.pair
    r = down.shape[0]
    if alpha != r:
        up = up * (r / alpha)
    up_t, down_t = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    shape = layer.update.delta.shape
    approx = up_t.float().reshape(shape[0], r) @ down_t.float().reshape(r, -1) * (alpha / r)
    layer.approx = approx.reshape(shape)
    layer.tensors = {
        f"{layer.key}.lora_down.weight": down_t,
        f"{layer.key}.lora_up.weight": up_t,
        f"{layer.key}.alpha": torch.tensor(float(alpha), dtype=dtype),
    }


def _dense(name: str, key: str, update: LayerUpdate, dtype: torch.dtype) -> _Layer:
    diff = update.delta.to(dtype).contiguous()
    tensors = {f"{key}.diff": diff}
    approx_bias = None
    if update.bias is not None:
        tensors[f"{key}.diff_b"] = update.bias.to(dtype).contiguous()
        approx_bias = tensors[f"{key}.diff_b"].float()
    return _Layer(name, key, update, tensors, None, diff.float(), approx_bias)


def kohya_state_dict(
    pipe: Any,
    updates: dict[str, LayerUpdate],
    *,
    kind: str = "lora",
    rank: int | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
    dense: str = "diff",
    dtype: torch.dtype = torch.float16,
) -> list[_Layer]:
    """Encode ``updates`` (by UNet module name) as kohya-named tensors for ``pipe``'s family."""
    from sdatom.families import family_of

    family, config = family_of(pipe), pipe.unet.config
    layers = []
    for name in sorted(updates):
        key = family.kohya_unet_name(name, config)
        if kind == "diff":
            layers.append(_dense(name, key, updates[name], dtype))
        else:
            layers.append(
                _encode(
                    name, key, updates[name], rank=rank, max_error=max_error, dense=dense,
                    dtype=dtype,
                )
            )  # fmt: skip
    keys = [layer.key for layer in layers]
    if len(set(keys)) != len(keys):  # a broken naming rule, not user input
        raise RuntimeError("two UNet modules got the same kohya name")
    ranks = [layer.rank for layer in layers if layer.rank is not None]
    if ranks:
        # One alpha for the whole file, the most common rank (alpha = rank on those layers):
        # diffusers 0.42 reads per-layer alphas of attention layers under names that match no
        # module and silently scales them by the most common alpha instead.
        alpha = Counter(ranks).most_common(1)[0][0]
        for layer in layers:
            if layer.rank is not None:
                _finish(layer, alpha, dtype)
    return layers


# ----------------------------------------------------------------------------- writing


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _save_with_hash(tensors: dict[str, torch.Tensor], meta: dict[str, str], out: Path) -> int:
    """Write a safetensors file atomically with ``sshs_model_hash`` (A1111's hash: sha256 of
    the bytes after the header) in its metadata; returns the file's size."""
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        raw = tmp.with_name(tmp.name + ".raw")
        try:
            save_file(tensors, str(raw), metadata=meta)
            with open(raw, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                sha = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    sha.update(chunk)
            header["__metadata__"] = {
                **header.get("__metadata__", {}),
                "sshs_model_hash": sha.hexdigest(),
            }
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
            with open(raw, "rb") as src, open(tmp, "wb") as dst:
                src.seek(8 + n)
                dst.write(struct.pack("<Q", len(text)) + text)
                for chunk in iter(lambda: src.read(1 << 24), b""):
                    dst.write(chunk)
        finally:
            raw.unlink(missing_ok=True)
    return out.stat().st_size


def base_fingerprint(updates: dict[str, LayerUpdate]) -> str:
    """A short hash of the base weights the updates were computed against (names, shapes and
    64 bf16-rounded values of each layer's W0): which base model a file needs."""
    h = hashlib.sha256()
    for name in sorted(updates):
        w = updates[name].module.weight.detach().reshape(-1)
        idx = torch.arange(min(64, w.numel())) * max(1, (w.numel() - 1) // 63)
        probe = w[idx.clamp(max=w.numel() - 1)].float().to(torch.bfloat16).float().tolist()
        h.update(json.dumps([name, list(updates[name].module.weight.shape), probe]).encode())
    return h.hexdigest()[:16]


def _metadata(
    run: Run, pipe: Any, out: Path, layers: list[_Layer], kind: str, extra: dict[str, str]
) -> dict[str, str]:
    import sdatom
    from sdatom.families import family_of

    ranks = [layer.rank for layer in layers if layer.rank is not None]
    algo = "full" if kind == "diff" else "locon"
    mixed = kind == "diff" or len(ranks) < len(layers)
    alphas = {
        float(t) for layer in layers for k, t in layer.tensors.items() if k.endswith(".alpha")
    }
    dim = int(alphas.pop()) if alphas else 0
    meta = {
        "ss_output_name": out.stem,
        "ss_network_module": "lycoris.kohya" if mixed else "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ss_network_args": json.dumps({"algo": algo, "conv_dim": str(dim), "conv_alpha": str(dim)}),
        **family_of(pipe).lora_metadata(pipe.unet.config),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": out.stem,
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "sdatom_version": sdatom.__version__,
        "sdatom_kind": kind,
        "sdatom_method": run.method,
        "sdatom_preset": str(run.config.get("preset") or ""),
        "sdatom_base_model": str(run.model or ""),
        "sdatom_trigger": _trigger(run),
        **extra,
    }
    return {k: v for k, v in meta.items() if v != ""}


def _trigger(run: Run) -> str:
    token, cls = run.config.get("token"), run.config.get("class_name")
    return f"{token} {cls}" if token and cls else str(token or "")


def _prepare(out: Path, option: str) -> None:
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"{option} {out}: the file name must end in .safetensors")
    if out.exists():
        raise UsageError(f"{option} {out} already exists; pass a new path or remove it first")


# ----------------------------------------------------------------------------- checks


@torch.no_grad()
def _image_difference(
    exact: Any, base: Any, layers: list[_Layer], run: Run, samples: int, steps: int
) -> dict[str, float]:
    """Generate ``samples`` fixed-seed images with the exact adapter and with the file's
    update added to the base weights; their mean and max absolute pixel difference."""
    import numpy as np

    from sdatom.sample import generate

    trigger = _trigger(run)
    prompts = [f"a photo of {trigger}" if trigger else "a photo"]
    options = {"n": samples, "seed": 0, "steps": steps}
    want = np.stack([s.image for s in generate(exact, prompts, **options)])
    for layer in layers:
        target = base.unet.get_submodule(layer.module)
        target.weight.add_(layer.approx.to(target.weight))
        if layer.approx_bias is not None:
            target.bias.add_(layer.approx_bias.to(target.bias))
    got = np.stack([s.image for s in generate(base, prompts, **options)])
    diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
    return {
        "images": float(len(want)),
        "steps": float(steps),
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
    }


# ----------------------------------------------------------------------------- export


def _load(run: Run, model: str | None) -> tuple[Any, Any, dict[str, LayerUpdate]]:
    """(the pipeline with the adapter live, the base pipeline, the dense updates)."""
    from sdatom.models import load_pipeline

    exact = load_run_pipeline(run, merge=False, dtype="fp32", device="cpu", model=model)
    own = model is None  # the run's own settings apply only to its own base model
    base = load_pipeline(
        model or run.model,
        dtype="fp32",
        device="cpu",
        config=run.config.get("model_config") if own else None,
        vae=run.config.get("vae") if own else None,
    )
    if run.config.get("train_token"):  # exported beside the file: the samples compare both
        from sdatom.token_embedding import load_into

        load_into(base, run.path, run.config["token"])
    updates = get_method(run.method).dense_updates(exact, base.unet)
    if not updates:
        raise UsageError(f"--run {run.path}: the adapter changes no UNet layer; nothing to export")
    return exact, base, updates


def _write(
    run: Run,
    out: Path,
    kind: str,
    *,
    rank: int | None,
    max_error: float | None,
    dense: str,
    dtype: str,
    samples: int,
    sample_steps: int,
    model: str | None,
    echo: Echo | None,
) -> FileReport:
    from sdatom.models import DTYPES

    if dtype not in ("fp16", "bf16", "fp32"):
        raise UsageError(f"--dtype {dtype!r} is not one of fp16, bf16, fp32")
    if samples < 0 or sample_steps < 1:
        raise UsageError("--samples must be 0 or more and --sample-steps at least 1")
    say = echo or (lambda _line: None)
    exact, base, updates = _load(run, model)
    if kind == "diff":
        numel = sum(
            u.delta.numel() + (0 if u.bias is None else u.bias.numel()) for u in updates.values()
        )
        say(
            f"writing the exact update of {len(updates)} layers as LyCORIS full diffs: "
            f"{_size(numel * DTYPES[dtype].itemsize)} ({dtype})"
        )
    layers = kohya_state_dict(
        exact,
        updates,
        kind=kind,
        rank=rank,
        max_error=DEFAULT_MAX_ERROR if max_error is None else max_error,
        dense=dense,
        dtype=DTYPES[dtype],
    )
    reports = [
        LayerReport(
            layer.module,
            layer.key,
            tuple(layer.update.delta.shape),
            layer.rank,
            _rel_error(layer.update.delta, layer.approx),
        )
        for layer in layers
    ]
    extra = {
        "sdatom_base_fingerprint": base_fingerprint(updates),
        "sdatom_rank": "" if rank is None else str(rank),
        "sdatom_max_error": ""
        if kind == "diff" or rank is not None
        else str(DEFAULT_MAX_ERROR if max_error is None else max_error),
        "sdatom_worst_layer_error": f"{max((r.error for r in reports), default=0.0):.3e}",
    }
    fingerprint = get_method(run.method).result_fingerprint(run.adapter)
    if fingerprint is not None:
        extra["sdatom_atoms_fingerprint"] = fingerprint
    tensors = {k: v for layer in layers for k, v in layer.tensors.items()}
    meta = _metadata(run, exact, out, layers, kind, extra)
    size = _save_with_hash(tensors, meta, out)
    report = FileReport(out, kind, size, reports)
    dense_layers = report.dense
    if kind == "lora" and dense_layers:
        report.notes.append(
            f"{len(dense_layers)} layers stored as full diffs (a low-rank pair would be no "
            "smaller); ComfyUI, A1111/Forge and LyCORIS read them, diffusers' "
            "load_lora_weights does not: pass --dense lora for a file diffusers loads"
        )
    if samples:
        report.image_diff = _image_difference(exact, base, layers, run, samples, sample_steps)
    return report


def export_lora(
    run_dir: str | os.PathLike | Run,
    out_file: str | os.PathLike,
    *,
    rank: int | None = None,
    max_error: float | None = None,
    dense: str = "diff",
    dtype: str = "fp16",
    samples: int = 2,
    sample_steps: int = 20,
    model: str | None = None,
    echo: Echo | None = None,
) -> FileReport:
    """Write the run's update as a kohya/LoCon LoRA file; see the module.

    ``samples`` fixed-seed images (``sample_steps`` steps) compare the file's update with the
    exact adapter (0 skips it). Written atomically.
    """
    run, out = as_run(run_dir), Path(out_file)
    _prepare(out, "--lora")
    if rank is not None and max_error is not None:
        raise UsageError("pass either --rank or --max-error, not both")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: the rank must be at least 1")
    if max_error is not None and not 0 < max_error < 1:
        raise UsageError(
            f"--max-error {max_error}: pass a relative error between 0 and 1, e.g. 0.01"
        )
    if dense not in DENSE_CHOICES:
        raise UsageError(f"--dense {dense!r} is not one of {', '.join(DENSE_CHOICES)}")
    return _write(
        run, out, "lora", rank=rank, max_error=max_error, dense=dense, dtype=dtype,
        samples=samples, sample_steps=sample_steps, model=model, echo=echo,
    )  # fmt: skip


def export_diff(
    run_dir: str | os.PathLike | Run,
    out_file: str | os.PathLike,
    *,
    dtype: str = "fp16",
    samples: int = 2,
    sample_steps: int = 20,
    model: str | None = None,
    echo: Echo | None = None,
) -> FileReport:
    """Write the run's exact update as LyCORIS full-diff keys (``<name>.diff``, ``.diff_b``).

    ``echo`` receives the file's size before anything is written. Written atomically.
    """
    run, out = as_run(run_dir), Path(out_file)
    _prepare(out, "--diff")
    return _write(
        run, out, "diff", rank=None, max_error=None, dense="diff", dtype=dtype,
        samples=samples, sample_steps=sample_steps, model=model, echo=echo,
    )  # fmt: skip
