"""The original (LDM / CompVis / Stability) single-file key layout of each component.

diffusers names a UNet's weights after its Python modules (``down_blocks.1.resnets.0.conv1``);
the checkpoints A1111, ComfyUI and kohya pass around use the layout of the original training
code (``model.diffusion_model.input_blocks.4.0.in_layers.2``). The maps here are built from each
model's config (any block count and layers per block) and are the exact inverse of what
diffusers' single-file loader (``diffusers.loaders.single_file_utils``) reads back. SD-1.x, SD-2.x
and SDXL UNets share one layout; SDXL adds ``label_emb`` (the pooled-text and size embedding).
Text encoders come in two layouts: the Hugging Face CLIP one (SD-1.x, SDXL's first encoder) and
OpenCLIP's (SD-2.x, SDXL's second encoder: fused q/k/v, ``resblocks``, a transposed projection).
"""

from __future__ import annotations

from typing import Any

import torch

from sdatom.errors import UsageError

__all__ = [
    "clip_text_to_ldm",
    "open_clip_text_to_ldm",
    "unet_module_to_ldm",
    "unet_to_ldm",
    "vae_to_ldm",
]

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
    # SDXL: the embedding of the pooled text and the size/crop ids.
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_VAE_ATTN = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _check_unet(config: Any) -> int:
    lpb = config.layers_per_block
    blocks_ok = all(
        t in ("CrossAttnDownBlock2D", "DownBlock2D") for t in config.down_block_types
    ) and all(t in ("CrossAttnUpBlock2D", "UpBlock2D") for t in config.up_block_types)
    if (
        not isinstance(lpb, int)
        or not blocks_ok
        or config.mid_block_type not in (None, "UNetMidBlock2DCrossAttn")
        or config.class_embed_type is not None
        or config.addition_embed_type not in (None, "text_time")
    ):
        raise UsageError(
            "--single-file: this UNet layout has no LDM single-file mapping (SD-1.x, SD-2.x "
            "and SDXL layouts only); export a diffusers folder with --merged instead"
        )
    return lpb


def _unet_prefixes(config: Any) -> dict[str, tuple[str, bool]]:
    """diffusers prefix -> (LDM prefix, is a resnet), from the UNet's config."""
    lpb = _check_unet(config)
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


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    """The UNet's weights under ``model.diffusion_model.*`` names."""
    prefixes = _unet_prefixes(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        new = _rename(key, prefixes, _RESNET, _UNET_TOP)
        if new is None:
            raise UsageError(f"--single-file: UNet weight {key!r} has no LDM name; use --merged")
        out["model.diffusion_model." + new] = value
    return out


def unet_module_to_ldm(name: str, config: Any) -> str:
    """The LDM name of one UNet module (``down_blocks.1.resnets.0.conv1`` ->
    ``input_blocks.4.0.in_layers.2``), the names SDXL LoRA files use."""
    new = _rename(name + ".", _unet_prefixes(config), _RESNET, _UNET_TOP)
    if new is None:
        raise UsageError(f"UNet module {name!r} has no LDM name")
    return new[:-1]


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    """The VAE's weights under ``first_stage_model.*`` names."""
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


def _text_state(text_encoder: Any) -> dict[str, torch.Tensor]:
    # transformers 5 dropped the ``text_model.`` level of CLIPTextModel's keys (kept by
    # CLIPTextModelWithProjection); checkpoints carry it.
    return {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
        for k, v in text_encoder.state_dict().items()
    }


def clip_text_to_ldm(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text encoder under ``prefix`` (``cond_stage_model.transformer.``
    for SD-1.x, ``conditioner.embedders.0.transformer.`` for SDXL's first encoder)."""
    return {prefix + k: v for k, v in _text_state(text_encoder).items()}


_OPEN_CLIP_LAYER = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def open_clip_text_to_ldm(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A text encoder in OpenCLIP's layout under ``prefix`` (``cond_stage_model.model.`` for
    SD-2.x, ``conditioner.embedders.1.model.`` for SDXL's second encoder): q/k/v fused into
    ``in_proj``, layers as ``transformer.resblocks``, the projection stored transposed."""
    state = _text_state(text_encoder)
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    out = {prefix + new: state.pop(old) for old, new in top.items()}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    for i in range(text_encoder.config.num_hidden_layers):
        hf, ldm = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{hf}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{ldm}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in _OPEN_CLIP_LAYER:
                out[f"{ldm}{b}{kind}"] = state.pop(f"{hf}{a}{kind}")
    left = [k for k in state if not k.endswith("position_ids")]
    if left:
        raise UsageError(f"--single-file: text encoder weight {left[0]!r} has no OpenCLIP name")
    return out
