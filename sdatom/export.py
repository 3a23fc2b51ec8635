"""Export a run's adapted model for tools that know nothing of sdatom.

- ``lora`` / ``diff``: small files for ComfyUI, A1111/Forge and diffusers
  (:mod:`sdatom.lorafile`).

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
from collections.abc import Callable
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
    vectors = int(run.config.get("token_vectors", 1)) if run.config.get("train_token") else 1
    if vectors > 1:
        raise UsageError(
            f"{run.path} trained a {vectors}-vector token, which needs new tokenizer entries a "
            "single-file checkpoint cannot hold: export --lora or --diff (the embedding is "
            "written beside, for A1111/ComfyUI) or --merged (a diffusers folder)"
        )
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


def _embedding_target(run: Run, out: Path) -> Path | None:
    """Where a ``--train-token`` run's embedding goes beside a LoRA/diff file (None: no token).

    Named after the token, because A1111 and ComfyUI call an embedding by its file name.
    """
    if not run.config.get("train_token"):
        return None
    target = out.parent / f"{run.config['token']}.safetensors"
    if target.exists():
        raise UsageError(
            f"{target} already exists (the token embedding goes beside the exported file under "
            "the token's name): write the export into another folder or remove it first"
        )
    return target


def _export_embedding(run: Run, target: Path) -> str:
    from sdatom.token_embedding import EMBEDDING_FILE

    with atomic_path(target) as tmp:
        shutil.copyfile(run.path / EMBEDDING_FILE, tmp)
    token = run.config["token"]
    return (
        f"token embedding: {target} (load it with the LoRA: A1111/Forge from embeddings/ and "
        f"{token} in prompts, ComfyUI from models/embeddings and embedding:{token}, diffusers "
        f"with pipe.load_textual_inversion(file, token='<{token}>') and <{token}>)"
    )


def export(
    run_dir: str | os.PathLike,
    *,
    merged: str | os.PathLike | None = None,
    single_file: str | os.PathLike | None = None,
    lora: str | os.PathLike | None = None,
    diff: str | os.PathLike | None = None,
    rank: int | None = None,
    max_error: float | None = None,
    dense: str = "diff",
    samples: int = 2,
    sample_steps: int = 20,
    push_to_hub: str | None = None,
    dtype: str | None = None,
    model: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """``sdatom export``: exactly one of ``merged`` (a folder), ``single_file``, ``lora`` or
    ``diff`` (files). Writes a model card (README.md) beside it and, with ``push_to_hub``,
    uploads both. ``echo`` receives the report lines (sizes, errors). Returns the path written.
    ``dtype`` defaults to fp32 for merged models and fp16 for ``lora``/``diff`` files.
    """
    from sdatom.card import CARD_FILE, GRID_FILE, write_model_card
    from sdatom.card import push_to_hub as upload

    targets = {"--merged": merged, "--single-file": single_file, "--lora": lora, "--diff": diff}
    given = [k for k, v in targets.items() if v is not None]
    if len(given) != 1:
        raise UsageError(
            "pass exactly one of --merged OUT_DIR, --single-file OUT.safetensors, "
            "--lora OUT.safetensors or --diff OUT.safetensors"
        )
    if lora is None and (rank is not None or max_error is not None or dense != "diff"):
        raise UsageError("--rank, --max-error and --dense go with --lora")
    say = echo or (lambda _line: None)
    run = as_run(run_dir)
    lines: list[str] = []
    dense_layers = 0
    embedding = None  # a --train-token run's embedding, written beside a LoRA/diff file
    if merged is not None or single_file is not None:
        write = export_merged if merged is not None else export_single_file
        out = write(
            run, merged or single_file, dtype=dtype or "fp32", model=model, progress=progress
        )
        kind = "diffusers" if merged is not None else "ldm-single-file"
        lines.append(f"exported: {out}")
    else:
        from sdatom.lorafile import export_diff, export_lora

        embedding = _embedding_target(run, Path(lora or diff))
        options = {"samples": samples, "sample_steps": sample_steps, "model": model}
        if lora is not None:
            report = export_lora(
                run, lora, rank=rank, max_error=max_error, dense=dense, dtype=dtype or "fp16",
                echo=say, **options,
            )  # fmt: skip
        else:
            report = export_diff(run, diff, dtype=dtype or "fp16", echo=say, **options)
        out, kind, lines = report.path, report.kind, report.lines()
        dense_layers = len(report.dense) if report.kind == "lora" else 0
        if embedding is not None:
            lines.append(_export_embedding(run, embedding))
    for line in lines:
        say(line)
    card = write_model_card(run, out, kind, report_lines=lines[1:], dense_layers=dense_layers)
    if card is not None:
        say(f"model card: {card}")
    else:
        say(f"model card: skipped, {out.parent / CARD_FILE} was not written by sdatom")
    if push_to_hub:
        paths = [out]
        if out.is_file():
            beside = (card, out.parent / GRID_FILE, embedding)
            paths += [p for p in beside if p is not None and p.is_file()]
        say(f"pushed: {upload(push_to_hub, paths)}")
    return out
