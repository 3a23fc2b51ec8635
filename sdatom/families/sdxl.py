"""Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP bigG) whose penultimate
hidden states, concatenated, condition the UNet, plus the second encoder's pooled projection
and six size ids per image (original size, crop corner, target size) through ``added_cond_kwargs``.
"""

from __future__ import annotations

from typing import Any

import torch

from sdatom.families import ldm
from sdatom.families.base import Architecture, Conditioning, Family
from sdatom.families.sd import (
    CLIP_L_TEXT,
    CLIP_VOCAB_SIZE,
    SD_VAE,
    TINY_TEXT,
    build_modules,
    tokenize,
)

__all__ = ["ARCHITECTURES", "StableDiffusionXL", "time_ids"]

# stabilityai/stable-diffusion-xl-base-1.0's scheduler: Euler, "leading" spacing.
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# The published text-encoder configs keep CLIP's old token ids (eos 2): transformers then
# pools at the highest token id (the first <|endoftext|>), which both tokenizers need.
_OLD_CLIP_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
BIGG_TEXT = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "with_projection": True,
    **_OLD_CLIP_IDS,
}

ARCHITECTURES: dict[str, Architecture] = {
    "random:sdxl": Architecture(
        family="sdxl",
        unet=SDXL_UNET,
        vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoders=({**CLIP_L_TEXT, **_OLD_CLIP_IDS}, BIGG_TEXT),
        scheduler=SCHEDULER,
        pad_tokens=("<|endoftext|>", "!"),
    ),
    # SDXL's topology at toy size: 3 UNet levels with 2 layers each, a 4-level VAE, and text
    # encoders of different widths (with equal widths diffusers' single-file loader cannot
    # tell them apart and silently loads encoder 1's weights into encoder 2).
    "tiny-sdxl": Architecture(
        family="sdxl",
        unet={
            **SDXL_UNET,
            "sample_size": 32,
            "block_out_channels": [32, 64, 64],
            "transformer_layers_per_block": [1, 1, 2],
            "attention_head_dim": [2, 4, 8],
            "cross_attention_dim": 96,
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
        },
        vae={
            **SD_VAE,
            "block_out_channels": [32, 32, 64, 64],
            "layers_per_block": 1,
            "sample_size": 256,
            "scaling_factor": 0.13025,
            "force_upcast": True,
        },
        text_encoders=(
            {**TINY_TEXT, **_OLD_CLIP_IDS},
            {
                **BIGG_TEXT,
                "hidden_size": 64,
                "intermediate_size": 74,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "projection_dim": 32,
            },
        ),
        scheduler=SCHEDULER,
        pad_tokens=("<|endoftext|>", "!"),
    ),
}


def time_ids(sizes: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 6) SDXL size ids from (B, 4) rows of (original h, w, crop top, left): the original
    size, the crop corner and the target size (``resolution`` square), as diffusers'
    ``train_dreambooth_lora_sdxl.py`` computes them."""
    target = torch.tensor([resolution, resolution], dtype=sizes.dtype).expand(len(sizes), 2)
    return torch.cat([sizes, target.to(sizes.device)], dim=1)


class StableDiffusionXL(Family):
    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    single_file_marker = "conditioner.embedders.1.model."
    embedding_keys = ("clip_l", "clip_g")

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def tokenizers(self, pipe: Any) -> list[Any]:
        return [pipe.tokenizer, pipe.tokenizer_2]

    def vae_dtype(self, pipe: Any, weight_dtype: torch.dtype, custom_vae: bool) -> torch.dtype:
        # SDXL's own VAE overflows in fp16; an fp16-fix VAE (--vae) may run in half precision.
        if custom_vae or not pipe.vae.config.get("force_upcast", False):
            return weight_dtype
        return torch.float32

    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers(pipe), self.text_encoders(pipe), strict=True):
            # As the pipeline does: a multi-vector token expands (token_embedding.write_into).
            converted = [pipe.maybe_convert_prompt(p, tokenizer) for p in prompts]
            out = encoder(tokenize(tokenizer, converted, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled output
        return Conditioning(torch.cat(hidden, dim=-1).float(), pooled.float())

    def unet_kwargs(
        self, cond: Conditioning, sizes: torch.Tensor, resolution: int
    ) -> dict[str, Any]:
        ids = time_ids(sizes.to(cond.hidden.device), resolution).to(cond.hidden.dtype)
        return {
            "encoder_hidden_states": cond.hidden,
            "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": ids},
        }

    def build(self, arch: Architecture, seed: int):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            **build_modules(arch, seed), force_zeros_for_empty_prompt=True
        )

    def single_file_state_dict(self, pipe: Any) -> dict[str, torch.Tensor]:
        return {
            **ldm.unet_to_ldm(pipe.unet),
            **ldm.vae_to_ldm(pipe.vae),
            **ldm.clip_text_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."),
            **ldm.open_clip_text_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."),
        }

    def kohya_unet_name(self, module_name: str, unet_config: Any) -> str:
        # kohya sd-scripts trains SDXL on the original (LDM) UNet: LDM module paths.
        return "lora_unet_" + ldm.unet_module_to_ldm(module_name, unet_config).replace(".", "_")

    def lora_metadata(self, unet_config: Any) -> dict[str, str]:
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        }
