"""The ``toy`` model: a complete Stable Diffusion pipeline sized for the toy world.

The same machinery as SD-1.x (an ``AutoencoderKL``, a ``CLIPTextModel`` with the real CLIP
tokenizer, a ``UNet2DConditionModel`` with cross-attention, SD's scaled-linear noise schedule),
shrunk to 32x32 pictures with 16x16x4 latents. ``scripts/pretrain_toy.py`` trains it on the
world; the weights ship inside the package (``weights/toy``, fp16), so ``--model toy`` works
offline and plain diffusers loads the folder.

The toy CLIP (``weights/toy-clip``) is an open_clip model trained contrastively on world pictures
and captions; the toy attribute net (``weights/toy-attrnet``) is a small CNN trained to predict
the world's attributes, whose features fill the fidelity ("DINO") slot of the evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).parent / "weights"
TOY_MODEL_DIR = WEIGHTS / "toy"
TOY_CLIP_DIR = WEIGHTS / "toy-clip"
TOY_CLIP_NAME = "sdatom-toy-clip"
TOY_ATTRNET_FILE = WEIGHTS / "toy-attrnet" / "attrnet.safetensors"

UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    # Cross-attention at both levels: text must reach the 16x16 level, or position is never
    # learned (the 8x8 level alone did not learn it in the feasibility run).
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128],
    "layers_per_block": 2,
    "cross_attention_dim": 64,
    "attention_head_dim": 2,
    "norm_num_groups": 32,
}
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 1.0,  # set from the trained encoder's latent std before export
}
TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
}
# SD-1.x's scaled-linear betas. Pretraining's first stage (``unet``) uses them as SD-1.x does
# (epsilon prediction); the shipped model is the second stage (``unet-zsnr``): the same betas
# rescaled to zero terminal SNR, v-prediction and "trailing" timesteps (Lin et al. 2024, "Common
# Diffusion Noise Schedules and Sample Steps are Flawed"; SD-2.x's v-prediction). Measured on the
# first stage: at t=999 SD-1.x's schedule leaves sqrt(alpha_bar) = 0.068 of the picture in the
# noise, enough for a 32-px picture's object position to be read from the noise itself, so the
# model never learned the position words (with the same seed, "left", "center" and "right" put
# the object in the same place). DDIM as the default sampler (deterministic, good at 25 steps).
EPSILON_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SCHEDULER: dict[str, Any] = {
    **EPSILON_SCHEDULER,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
# open_clip model config of the toy CLIP (registered under TOY_CLIP_NAME).
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 4,
        "width": 128,
        "layers": 4,
        "head_width": 32,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


# `sdatom train --model toy` without other options (configs/toy.yaml holds the same values; a
# test keeps them equal). Measured on the toy subjects (QUALITY.md): the toy text encoder turns
# the rare token `sks` into almost nothing (`a photo of sks square` is 4.0 from `a photo of a
# square` in its hidden states, two colour words 150-170 apart), so no adapter drew a subject
# (fidelity 0.00 at any lr, prior weight or caption tried); training the token's embedding
# beside the atoms (`train_token`) draws it in 18 of 18 protocol images at 300 steps, drift
# 0.00, world knowledge unchanged. Token lr 5e-3: as good as 1e-3 at 300 steps and twice as
# far at 150 (fidelity 0.56 against 0.28). One vector settles the checkered subjects on a look
# pretraining showed (white-and-cyan checks: the checkered cross 0.00 at 300 and 600 steps);
# four vectors (`token_vectors`) draw it (0.72 at 300, 0.78 at 450; checkered square 0.06 ->
# 0.78, triangle 0.11 -> 0.67 at 450), eight no better (0.44-0.50), and past 450 steps the
# token starts to carry the shape too (cross 0.17 at 600): `scripts/probe_toy.py run`. Over all
# eleven toy subjects (QUALITY.md, "Fidelity over training steps"): fidelity 0.57 / 0.67 / 0.66 /
# 0.52 at 150 / 300 / 450 / 600 steps, position best at 450 (0.95). Atoms lr 1e-3: 3e-4 ties
# over the eleven (0.66 against 0.65, paired +0.01 +- 0.11) and is worse on position and on
# the checkered subjects; 3e-3 was worse on the two subjects tried (QUALITY.md). These were
# measured with the first VAE decoder; with the fine-tuned one (`vae-decoder`) the same
# defaults give 0.67 over three seeds (0.71 over two, 0.61 before); steps and lr not re-swept.
TRAIN_DEFAULTS: dict[str, Any] = {
    "resolution": 32,
    "steps": 450,
    "batch_size": 4,
    "lr": 1e-3,
    "train_token": True,
    "token_lr": 5e-3,
    "token_vectors": 4,
    "prior": True,
    "num_class_images": 50,
    "class_sample_steps": 25,
    "class_batch_size": 8,
    "prior_loss_weight": 1.0,
    "checkpoint_every": 100,
    "validation_steps": 25,
}


# Classifier-free guidance `sdatom sample` uses on the toy model when --guidance is not given
# (sdatom.sample.default_guidance). Chosen on the base model's 400 held-in prompts (`--stage
# eval`, DDIM 30 steps), not on the toy subjects: two-tone appearance 0.858 at SD-1.x's 7.5,
# 0.889 at 7.5 with guidance_rescale 0.7, 0.926 at 5, 0.938 at 3 (within the noise of 5, and
# shape 0.998 and position 0.990 there against 1.000 and 0.995); background, shape and solid
# appearance 0.996-1.000 at each. A zero-terminal-SNR v-prediction model over-saturates at
# SD-1.x's guidance, and two-tone looks are what it loses first. QUALITY.md has the figures.
SAMPLE_GUIDANCE = 5.0


def build_toy_pipeline(seed: int = 0, scheduler: dict[str, Any] | None = None):
    """The toy pipeline with seeded random weights (what pretraining starts from)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdatom.models import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**(scheduler or SCHEDULER)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def register_toy_clip() -> None:
    """Make the toy CLIP's architecture known to open_clip (idempotent)."""
    import open_clip

    if TOY_CLIP_NAME not in open_clip.list_models():
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{TOY_CLIP_NAME}.json"
            path.write_text(json.dumps(CLIP_CONFIG))
            open_clip.add_model_config(path)
