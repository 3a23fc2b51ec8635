"""Export a run's adapted model for tools that know nothing of sdatom.

- :func:`export_merged`: a diffusers pipeline folder with the adapter folded into the weights,
  loadable with ``StableDiffusionPipeline.from_pretrained(folder)`` (plain diffusers modules).
- :func:`export_single_file`: one ``.safetensors`` checkpoint in the original LDM/CompVis key
  layout (``model.diffusion_model.*``, ``first_stage_model.*``, and ``cond_stage_model.*`` or
  SDXL's ``conditioner.embedders.*``) that A1111, ComfyUI and kohya load; the key maps live in
  :mod:`sdatom.families.ldm`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sdatom.errors import UsageError
from sdatom.fileio import atomic_path, atomic_write_text
from sdatom.methods import get_method
from sdatom.progress import progress_bar
from sdatom.runs import Run, as_run, load_run_pipeline

__all__ = ["export", "export_merged", "export_single_file", "merged_pipeline", "to_ldm_state_dict"]

EXPORT_INFO = "sdatom_export.json"


# ----------------------------------------------------------------------------- merging


def merged_pipeline(run_dir: str | os.PathLike | Run, *, model: str | None = None):
    """The run's pipeline on the CPU in float32 with the adapter folded in and no wrappers left.

    The UNet (and text encoders) hold only plain diffusers/transformers modules afterwards.
    """
    from sdatom.families import family_of

    run = as_run(run_dir)
    pipe = load_run_pipeline(run, merge=True, dtype="fp32", device="cpu", model=model)
    get_method(run.method).unwrap(pipe)
    for component in (pipe.unet, *family_of(pipe).text_encoders(pipe)):
        foreign = [
            f"{name} ({type(m).__module__})"
            for name, m in component.named_modules()
            if type(m).__module__.split(".")[0] in ("sdatom", "peft")
        ]
        if foreign:  # a broken invariant of Method.unwrap, not user input
            raise RuntimeError(f"adapter modules left after merging: {foreign[:3]}")
    return pipe


def _prepare_target(path: Path, option: str) -> None:
    if path.exists() and (path.is_file() or any(path.iterdir())):
        raise UsageError(f"{option} {path} already exists; pass a new path or remove it first")


def _cast(dtype: str) -> torch.dtype:
    from sdatom.models import DTYPES

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _export_info(run: Run, kind: str, dtype: str) -> dict[str, Any]:
    import sdatom

    return {
        "kind": kind,
        "run": str(run.path),
        "method": run.method,
        "base_model": run.model,
        "dtype": dtype,
        "sdatom_version": sdatom.__version__,
    }


def export_merged(
    run_dir: str | os.PathLike | Run,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    model: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the run's model, adapter folded in, as a diffusers pipeline folder (safetensors).

    ``out_dir`` must not exist (or be empty). The folder is written beside it and renamed
    into place, so a crash never leaves a half-written pipeline. Returns ``out_dir``.
    """
    run = as_run(run_dir)
    out = Path(out_dir)
    _prepare_target(out, "--merged")
    torch_dtype = _cast(dtype)
    bar = progress_bar(2, "export", enabled=progress, unit="step")
    bar.set_postfix_str("load and merge")
    pipe = merged_pipeline(run, model=model).to(dtype=torch_dtype)
    bar.update(1)
    bar.set_postfix_str("write")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        bar.update(1)
        info = _export_info(run, "diffusers", dtype)
        atomic_write_text(tmp / EXPORT_INFO, json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- single file


def to_ldm_state_dict(pipe: Any, family: str | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original single-file names of its family
    (:mod:`sdatom.families.ldm`); ``family`` names it when ``pipe`` is not a diffusers pipeline."""
    from sdatom.families import family_of, get_family

    return (get_family(family) if family else family_of(pipe)).single_file_state_dict(pipe)


def export_single_file(
    run_dir: str | os.PathLike | Run,
    out_file: str | os.PathLike,
    *,
    dtype: str = "fp32",
    model: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the run's merged model as one LDM-layout ``.safetensors`` checkpoint.

    Loads back with the family's ``from_single_file`` (pass ``config=`` the base
    model's diffusers folder when offline) and in A1111/ComfyUI. Written atomically.
    """
    from safetensors.torch import save_file

    run = as_run(run_dir)
    out = Path(out_file)
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"--single-file {out}: the file name must end in .safetensors")
    _prepare_target(out, "--single-file")
    torch_dtype = _cast(dtype)
    with progress_bar(2, "export", enabled=progress, unit="step") as bar:
        bar.set_postfix_str("load and merge")
        state = to_ldm_state_dict(merged_pipeline(run, model=model))
        bar.update(1)
        bar.set_postfix_str("write")
        tensors = {k: v.detach().to(torch_dtype).contiguous() for k, v in state.items()}
        meta = {k: str(v) for k, v in _export_info(run, "ldm-single-file", dtype).items()}
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", **meta})
        bar.update(1)
    return out


def export(
    run_dir: str | os.PathLike,
    *,
    merged: str | os.PathLike | None = None,
    single_file: str | os.PathLike | None = None,
    dtype: str = "fp32",
    model: str | None = None,
    progress: bool = True,
) -> Path:
    """``sdatom export``: exactly one of ``merged`` (a folder) or ``single_file`` (a file)."""
    if (merged is None) == (single_file is None):
        raise UsageError("pass exactly one of --merged OUT_DIR or --single-file OUT.safetensors")
    if merged is not None:
        return export_merged(run_dir, merged, dtype=dtype, model=model, progress=progress)
    return export_single_file(run_dir, single_file, dtype=dtype, model=model, progress=progress)
