"""Export a run's adapted model for tools that know nothing of sdatom.

- :func:`export_merged`: a diffusers pipeline folder with the adapter folded into the weights,
  loadable with ``StableDiffusionPipeline.from_pretrained(folder)`` (plain diffusers modules).
- :func:`export_single_file`: one ``.safetensors`` checkpoint in the original LDM/CompVis key
  layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``) that
  A1111, ComfyUI and kohya load. SD-1.x only for now.

The key mapping follows diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``
but is built from the model's config (any block count and layers per block), and is the exact
inverse of what diffusers' single-file loader reads.
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

    The UNet (and text encoder) hold only plain diffusers/transformers modules afterwards.
    """
    run = as_run(run_dir)
    pipe = load_run_pipeline(run, merge=True, dtype="fp32", device="cpu", model=model)
    get_method(run.method).unwrap(pipe)
    for component in (pipe.unet, pipe.text_encoder):
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


# ----------------------------------------------------------------------------- LDM keys


_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_VAE_ATTN = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _check_sd1_unet(config: Any) -> int:
    lpb = config.layers_per_block
    blocks_ok = all(
        t in ("CrossAttnDownBlock2D", "DownBlock2D") for t in config.down_block_types
    ) and all(t in ("CrossAttnUpBlock2D", "UpBlock2D") for t in config.up_block_types)
    if (
        not isinstance(lpb, int)
        or not blocks_ok
        or config.mid_block_type not in (None, "UNetMidBlock2DCrossAttn")
        or config.class_embed_type is not None
        or config.addition_embed_type is not None
    ):
        raise UsageError(
            "--single-file: this UNet layout has no LDM single-file mapping yet "
            "(SD-1.x layouts only); export a diffusers folder with --merged instead"
        )
    return lpb


def _unet_prefixes(config: Any) -> dict[str, tuple[str, bool]]:
    """diffusers prefix -> (LDM prefix, is a resnet), from the UNet's config."""
    lpb = _check_sd1_unet(config)
    stride = lpb + 1
    nb = len(config.block_out_channels)
    down_attn = [t.startswith("CrossAttn") for t in config.down_block_types]
    up_attn = [t.startswith("CrossAttn") for t in config.up_block_types]
    out: dict[str, tuple[str, bool]] = {}
    for i in range(nb):
        for j in range(lpb):
            ldm = f"input_blocks.{stride * i + j + 1}"
            out[f"down_blocks.{i}.resnets.{j}."] = (f"{ldm}.0.", True)
            if down_attn[i]:
                out[f"down_blocks.{i}.attentions.{j}."] = (f"{ldm}.1.", False)
        if i < nb - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = (
                f"input_blocks.{stride * (i + 1)}.0.op.",
                False,
            )
        for j in range(stride):
            ldm = f"output_blocks.{stride * i + j}"
            out[f"up_blocks.{i}.resnets.{j}."] = (f"{ldm}.0.", True)
            if up_attn[i]:
                out[f"up_blocks.{i}.attentions.{j}."] = (f"{ldm}.1.", False)
        if i < nb - 1:
            slot = 2 if up_attn[i] else 1
            out[f"up_blocks.{i}.upsamplers.0."] = (
                f"output_blocks.{stride * i + lpb}.{slot}.",
                False,
            )
    out["mid_block.resnets.0."] = ("middle_block.0.", True)
    out["mid_block.attentions.0."] = ("middle_block.1.", False)
    out["mid_block.resnets.1."] = ("middle_block.2.", True)
    return out


def _rename(key: str, prefixes: dict[str, tuple[str, bool]], suffixes, top: dict[str, str]):
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old) :]
    for old, (new, is_resnet) in prefixes.items():
        if key.startswith(old):
            rest = key[len(old) :]
            if is_resnet:
                for a, b in suffixes:
                    if rest.startswith(a):
                        rest = b + rest[len(a) :]
                        break
            return new + rest
    return None


def _convert_unet(unet: Any) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        new = _rename(key, prefixes, _RESNET, _UNET_TOP)
        if new is None:
            raise UsageError(f"--single-file: UNet weight {key!r} has no LDM name; use --merged")
        out["model.diffusion_model." + new] = value
    return out


def _convert_vae(vae: Any) -> dict[str, torch.Tensor]:
    config = vae.config
    nb, lpb = len(config.block_out_channels), config.layers_per_block
    prefixes: dict[str, tuple[str, bool]] = {}
    for i in range(nb):
        for j in range(lpb):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = (
                f"encoder.down.{i}.block.{j}.",
                True,
            )
        if i < nb - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = (
                f"encoder.down.{i}.downsample.",
                False,
            )
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = (
                f"decoder.up.{nb - 1 - i}.upsample.",
                False,
            )
        for j in range(lpb + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = (
                f"decoder.up.{nb - 1 - i}.block.{j}.",
                True,
            )
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", True)
        prefixes[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", True)
    top = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    out = {}
    for key, value in vae.state_dict().items():
        attn = next(
            (p for p in ("encoder.mid_block.attentions.0.", "decoder.mid_block.attentions.0.")
             if key.startswith(p)),
            None,
        )  # fmt: skip
        if attn is not None:
            rest = key[len(attn) :]
            for a, b in _VAE_ATTN:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            new = attn.replace("mid_block.attentions.0.", "mid.attn_1.") + rest
            if value.ndim == 2:  # the LDM VAE attention uses 1x1 convs
                value = value.reshape(*value.shape, 1, 1)
        elif key.split(".")[0] in ("encoder", "decoder") and key.split(".")[1] in (
            "down_blocks",
            "up_blocks",
            "mid_block",
        ):
            new = _rename(key, prefixes, (("conv_shortcut.", "nin_shortcut."),), {})
        else:
            new = _rename(key, {}, (), top) or key  # conv_in/out, quant convs keep their names
        if new is None:
            raise UsageError(f"--single-file: VAE weight {key!r} has no LDM name; use --merged")
        out["first_stage_model." + new] = value
    return out


def _check_sd1_text_encoder(text_encoder: Any, unet: Any) -> None:
    cfg = text_encoder.config
    if cfg.hidden_act != "quick_gelu" or unet.config.cross_attention_dim == 1024:
        raise UsageError(
            "--single-file: SD-2.x checkpoints (OpenCLIP text encoder) are not supported yet; "
            "export a diffusers folder with --merged instead"
        )


def to_ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and (SD-1 CLIP) text encoder weights under LDM/CompVis names."""
    _check_sd1_text_encoder(pipe.text_encoder, pipe.unet)
    state = {**_convert_unet(pipe.unet), **_convert_vae(pipe.vae)}
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 dropped the ``text_model.`` level that SD-1 checkpoints carry.
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    return state


def export_single_file(
    run_dir: str | os.PathLike | Run,
    out_file: str | os.PathLike,
    *,
    dtype: str = "fp32",
    model: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the run's merged model as one LDM-layout ``.safetensors`` checkpoint (SD-1.x).

    Loads back with ``StableDiffusionPipeline.from_single_file`` (pass ``config=`` the base
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
