"""The model-family interface: what train, sample, export and inspect ask of a model family.

A family is one kind of Stable Diffusion pipeline (SD-1.x/2.x, SDXL). Everything that differs
between families lives behind this interface, chosen once from the pipeline's class
(:func:`sdatom.families.family_of`); the rest of sdatom never asks which family it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Architecture", "Conditioning", "Family"]


@dataclass(frozen=True)
class Architecture:
    """The configs of one built architecture (``tiny``, ``random:sd15``, ``random:sdxl``, ...).

    ``text_encoders`` lists one config per text encoder, in the pipeline's order, and
    ``pad_tokens`` the pad token of each tokenizer.
    """

    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    scheduler: dict[str, Any]
    pad_tokens: tuple[str, ...] = ("<|endoftext|>",)

    @property
    def text_encoder(self) -> dict[str, Any]:
        """The first text encoder's config."""
        return self.text_encoders[0]

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per prompt: the text encoders' hidden states
    (``encoder_hidden_states``) and, for SDXL, the pooled text embedding (``text_embeds``)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @staticmethod
    def cat(rows: list[Conditioning]) -> Conditioning:
        pooled = None if rows[0].pooled is None else torch.cat([r.pooled for r in rows])
        return Conditioning(torch.cat([r.hidden for r in rows]), pooled)


class Family:
    """One model family. Subclasses set the class attributes and implement the methods."""

    #: Short name recorded in run folders and reports (``sd``, ``sdxl``).
    name: str = ""
    #: What users call it, in messages.
    label: str = ""
    #: The diffusers pipeline class names this family loads.
    pipeline_classes: tuple[str, ...] = ()
    #: Extra keyword arguments of the pipeline's ``from_pretrained``.
    load_kwargs: dict[str, Any] = {}
    #: A key prefix only this family's original single-file checkpoints hold (None: the
    #: family a file without any other family's marker is read as).
    single_file_marker: str | None = None
    #: The keys of a textual-inversion file (A1111, ComfyUI), one per text encoder in order.
    embedding_keys: tuple[str, ...] = ("emb_params",)

    def pipeline_class(self):
        """The diffusers pipeline class that loads and runs this family."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def matches(self, pipeline_class: str) -> bool:
        return pipeline_class in self.pipeline_classes

    # -- components
    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        """The pipeline's text encoders, in order."""
        raise NotImplementedError

    def tokenizers(self, pipe: Any) -> list[Any]:
        """The pipeline's tokenizers, in the text encoders' order."""
        raise NotImplementedError

    def vae_dtype(self, pipe: Any, weight_dtype: torch.dtype, custom_vae: bool) -> torch.dtype:
        """The dtype the frozen VAE runs in during training."""
        return weight_dtype

    # -- conditioning
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> Conditioning:
        """The UNet's conditioning for ``prompts`` (no classifier-free guidance), in fp32."""
        raise NotImplementedError

    def unet_kwargs(
        self, cond: Conditioning, sizes: torch.Tensor, resolution: int
    ) -> dict[str, Any]:
        """Keyword arguments of ``unet(noisy, t, **kwargs)`` for a batch.

        ``sizes`` is (B, 4) per row: the image's height and width before resizing and the
        top/left corner of the crop taken (families without size conditioning ignore it).
        """
        return {"encoder_hidden_states": cond.hidden}

    # -- building
    def build(self, arch: Architecture, seed: int):
        """A pipeline of ``arch`` with seeded random weights."""
        raise NotImplementedError

    # -- the original (LDM) single-file layout
    def single_file_state_dict(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The pipeline's weights under the original single-file checkpoint's key names."""
        raise NotImplementedError

    # -- LoRA files for other tools (kohya / LoCon / LyCORIS naming)
    def kohya_unet_name(self, module_name: str, unet_config: Any) -> str:
        """The kohya-style name of a UNet module in LoRA files for this family
        (``lora_unet_<module path with . -> _>``); subclasses say which module path."""
        return "lora_unet_" + module_name.replace(".", "_")

    def lora_metadata(self, unet_config: Any) -> dict[str, str]:
        """What A1111 (``ss_base_model_version``, ``ss_v2``) and Forge
        (``modelspec.architecture``) read to tell which base model a LoRA file is for."""
        raise NotImplementedError
