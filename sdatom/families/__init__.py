"""Model families, one module each: what differs between Stable Diffusion 1.x/2.x
(:mod:`~sdatom.families.sd`) and SDXL (:mod:`~sdatom.families.sdxl`) — prompt encoding, the
UNet's extra conditioning, built configs, the original single-file layout
(:mod:`~sdatom.families.ldm`). A new family is one module with a :class:`Family` subclass and
one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from sdatom.errors import ModelLoadError
from sdatom.families.base import Architecture, Conditioning, Family
from sdatom.families.sd import ARCHITECTURES as _SD
from sdatom.families.sd import StableDiffusion
from sdatom.families.sdxl import ARCHITECTURES as _SDXL
from sdatom.families.sdxl import StableDiffusionXL

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "Architecture",
    "Conditioning",
    "Family",
    "family_of",
    "family_of_class",
    "family_of_single_file",
    "get_family",
]

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL())}

#: Every built architecture (random weights, made offline), by spec.
ARCHITECTURES: dict[str, Architecture] = {**_SD, **_SDXL}

# Denoisers with (almost) no convolutions: nothing for filter atoms to tune.
_NO_CONVS = {
    "StableDiffusion3": "SD3's transformer has one patch-embedding convolution",
    "Flux": "Flux's transformer has no convolutions",
}
# Key prefixes of those families' original single-file checkpoints.
_NO_CONVS_MARKERS = {
    "model.diffusion_model.joint_blocks.": "StableDiffusion3Pipeline",
    "double_blocks.": "FluxPipeline",
    "model.diffusion_model.double_blocks.": "FluxPipeline",
}


def get_family(name: str) -> Family:
    return FAMILIES[name]


def family_of_class(pipeline_class: str, source: str) -> Family:
    """The family that loads a pipeline class (``model_index.json``'s ``_class_name``); any
    other class is refused in one line that says why."""
    for family in FAMILIES.values():
        if family.matches(pipeline_class):
            return family
    for prefix, why in _NO_CONVS.items():
        if pipeline_class.startswith(prefix):
            raise ModelLoadError(
                f"{source} is a {pipeline_class} model: filter atoms tune convolutions and "
                f"{why}; sdatom works with Stable Diffusion 1.x, 2.x and SDXL models"
            )
    raise ModelLoadError(
        f"{source} is a {pipeline_class or 'unknown'} pipeline, which sdatom does not support: "
        "it works with Stable Diffusion 1.x, 2.x and SDXL models"
    )


def family_of_single_file(keys: list[str], source: str) -> Family:
    """The family of an original single-file checkpoint, from its key names."""
    for family in FAMILIES.values():
        if family.single_file_marker and any(k.startswith(family.single_file_marker) for k in keys):
            return family
    for marker, cls in _NO_CONVS_MARKERS.items():
        if any(k.startswith(marker) for k in keys):
            family_of_class(cls, source)  # raises, saying why
    return next(f for f in FAMILIES.values() if f.single_file_marker is None)


def family_of(pipe: Any) -> Family:
    """The family of a loaded pipeline."""
    return family_of_class(type(pipe).__name__, type(pipe).__name__)
