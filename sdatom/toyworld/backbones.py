"""The evaluation backbones of the toy world: the toy CLIP and the toy attribute net.

``sdatom eval`` on a ``--model toy`` run uses them by default, so CLIP-T and CLIP-I are measured
by a CLIP that knows the world, and the fidelity ("DINO") slot by a net trained on it.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms as T
from transformers.modeling_outputs import BaseModelOutput

from sdatom.errors import UsageError
from sdatom.toyworld import attrnet
from sdatom.toyworld.model import TOY_ATTRNET_FILE, TOY_CLIP_DIR, TOY_CLIP_NAME, register_toy_clip

CLIP_FILE = TOY_CLIP_DIR / "open_clip_model.safetensors"
CLIP_LABEL = f"{TOY_CLIP_NAME} (open_clip, trained contrastively on the toy world)"


class AttrNetFeatures(nn.Module):
    """The attribute net as a feature extractor with the DINO slot's calling convention."""

    def __init__(self, net: attrnet.AttrNet):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.net.features(pixel_values)[:, None])


def _require(path, what: str) -> None:
    if not path.is_file():
        raise UsageError(
            f"the {what} is not in this install ({path}): pretrain it with "
            "scripts/pretrain_toy.py, or pass --clip-weights/--dino-weights or --random-backbones"
        )


def load_toy_clip(device: str = "cpu"):
    """(model, preprocess, tokenizer) of the shipped toy CLIP."""
    import open_clip

    from sdatom.eval.backbones import _quiet

    _require(CLIP_FILE, "toy CLIP")
    register_toy_clip()
    with _quiet():  # "no pretrained weights loaded": they are loaded just below
        model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP_NAME)
    model.load_state_dict({k: v.float() for k, v in load_file(CLIP_FILE).items()})
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(TOY_CLIP_NAME)


def load_toy_attrnet(device: str = "cpu") -> attrnet.AttrNet:
    _require(TOY_ATTRNET_FILE, "toy attribute net")
    net = attrnet.AttrNet()
    net.load_state_dict({k: v.float() for k, v in load_file(TOY_ATTRNET_FILE).items()})
    return net.to(device).eval()


def toy_backbones(device: str = "cpu", lpips_net: str = "alex"):
    """Backbones for a toy run: toy CLIP, the attribute net in the DINO slot, and LPIPS."""
    from sdatom.eval.backbones import Backbones, _load_lpips

    clip, preprocess, tokenizer = load_toy_clip(device)
    net = AttrNetFeatures(load_toy_attrnet(device))
    lp, lp_note, lp_name = _load_lpips(lpips_net, False, device)
    return Backbones(
        clip=clip,
        clip_preprocess=preprocess,
        clip_tokenizer=tokenizer,
        dino=net,
        dino_preprocess=T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize(0.5, 0.5)]),
        lpips=lp,
        lpips_note=lp_note,
        random=False,
        device=device,
        names={
            "clip": CLIP_LABEL,
            "dino": attrnet.NAME,
            "lpips": lp_name if lp is not None else None,
        },
    )
