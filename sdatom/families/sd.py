"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states condition the
UNet; SD-2.x differs only in configs (OpenCLIP ViT-H text encoder, linear projections,
v-prediction at 768 px), which the pipeline's own configs carry."""

from __future__ import annotations

from typing import Any

import torch

from sdatom.families import ldm
from sdatom.families.base import Architecture, Conditioning, Family

__all__ = ["ARCHITECTURES", "StableDiffusion"]

# The scheduler every SD-1.x checkpoint ships (PNDM, scaled-linear betas).
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
CLIP_VOCAB_SIZE = 49408
CLIP_L_TEXT = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

#: The tiny models' text encoder: CLIP's layout and tokenizer at toy width.
TINY_TEXT = {
    **CLIP_L_TEXT,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}

ARCHITECTURES: dict[str, Architecture] = {
    "tiny": Architecture(
        family="sd",
        unet={
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={
            **SD_VAE,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "sample_size": 64,
        },
        text_encoders=(TINY_TEXT,),
        scheduler=SCHEDULER,
    ),
    "random:sd15": Architecture(
        family="sd", unet=SD15_UNET, vae=SD_VAE, text_encoders=(CLIP_L_TEXT,), scheduler=SCHEDULER
    ),
    # stabilityai/stable-diffusion-2-1 (768 px, v-prediction, OpenCLIP ViT-H text encoder).
    "random:sd21": Architecture(
        family="sd",
        unet={
            **SD15_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        vae={**SD_VAE, "sample_size": 768},
        text_encoders=(
            {
                **CLIP_L_TEXT,
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 23,
                "num_attention_heads": 16,
                "hidden_act": "gelu",
                "projection_dim": 512,
            },
        ),
        scheduler={**SCHEDULER, "prediction_type": "v_prediction"},
        pad_tokens=("!",),
    ),
}


def tokenize(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Token ids padded to the tokenizer's length (77), as every SD pipeline encodes them."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def build_modules(arch: Architecture, seed: int) -> dict[str, Any]:
    """UNet, VAE, scheduler and the text encoders/tokenizers of ``arch``, seeded."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdatom.models import clip_tokenizer

    torch.manual_seed(seed)
    modules: dict[str, Any] = {"unet": UNet2DConditionModel(**arch.unet)}
    torch.manual_seed(seed + 1)
    modules["vae"] = AutoencoderKL(**arch.vae)
    for i, (config, pad) in enumerate(zip(arch.text_encoders, arch.pad_tokens, strict=True)):
        suffix = "" if i == 0 else f"_{i + 1}"
        torch.manual_seed(seed + 2 + i)
        cls = CLIPTextModelWithProjection if config.get("with_projection") else CLIPTextModel
        fields = {k: v for k, v in config.items() if k != "with_projection"}
        modules["text_encoder" + suffix] = cls(CLIPTextConfig(**fields))
        modules["tokenizer" + suffix] = clip_tokenizer(pad)
    kind = arch.scheduler["_class_name"]
    settings = {k: v for k, v in arch.scheduler.items() if k != "_class_name"}
    modules["scheduler"] = getattr(diffusers, kind)(**settings)
    return modules


class StableDiffusion(Family):
    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None}  # an optional component sdatom never uses

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        return [pipe.text_encoder]

    def tokenizers(self, pipe: Any) -> list[Any]:
        return [pipe.tokenizer]

    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> Conditioning:
        # As the pipeline does: a multi-vector token expands into its tokens (token_embedding).
        prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
        ids = tokenize(pipe.tokenizer, prompts, device)
        return Conditioning(pipe.text_encoder(ids)[0].float())

    def build(self, arch: Architecture, seed: int):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            **build_modules(arch, seed),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def single_file_state_dict(self, pipe: Any) -> dict[str, torch.Tensor]:
        state = {**ldm.unet_to_ldm(pipe.unet), **ldm.vae_to_ldm(pipe.vae)}
        if pipe.text_encoder.config.hidden_act == "quick_gelu":  # SD-1.x: OpenAI CLIP ViT-L
            state.update(ldm.clip_text_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
        else:  # SD-2.x: OpenCLIP ViT-H
            state.update(ldm.open_clip_text_to_ldm(pipe.text_encoder, "cond_stage_model.model."))
        return state

    def kohya_unet_name(self, module_name: str, unet_config: Any) -> str:
        # kohya sd-scripts trains SD-1.x/2.x on the diffusers UNet: diffusers module paths.
        return "lora_unet_" + module_name.replace(".", "_")

    def lora_metadata(self, unet_config: Any) -> dict[str, str]:
        # SD-2.x: OpenCLIP ViT-H text states (1024 wide); 768-px checkpoints predict v.
        v2 = unet_config.cross_attention_dim == 1024
        if not v2:
            return {
                "ss_base_model_version": "sd_v1",
                "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-v1/lora",
            }
        arch = (
            "stable-diffusion-v2-768-v"
            if unet_config.sample_size >= 96
            else "stable-diffusion-v2-512"
        )
        return {
            "ss_base_model_version": "sd_v2",
            "ss_v2": "True",
            "modelspec.architecture": f"{arch}/lora",
        }
