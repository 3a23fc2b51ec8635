"""The toy attribute net: a small CNN trained to predict a world picture's attributes.

Its 128-d features fill the fidelity ("DINO") slot of ``sdatom eval`` on toy runs: two pictures
of the same object embed close together. It is supervised on the world's labels, not
self-supervised like DINO, and the report names it as what it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdatom.toyworld.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, TEXTURES, ToyObject

NAME = "toy-attrnet (CNN supervised on toy-world attributes; fills the DINO slot)"
HEADS = {
    "background": len(BACKGROUNDS),
    "shape": len(SHAPES),
    "texture": len(TEXTURES),
    "position": len(POSITIONS),
    "colors": len(COLORS),  # multi-label
}


class AttrNet(nn.Module):
    """32x32 RGB in [-1, 1] -> per-attribute logits; ``features`` gives the 128-d embedding."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()
            )

        self.body = nn.Sequential(
            block(3, width, 1),
            block(width, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2),
            block(4 * width, 4 * width, 2),
        )
        self.proj = nn.Linear(4 * width * 16, dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        return self.proj(self.body(x).flatten(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.silu(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


def attribute_targets(objs: list[ToyObject]) -> dict[str, torch.Tensor]:
    colors = torch.zeros(len(objs), len(COLORS))
    for i, o in enumerate(objs):
        for c in o.colors:
            colors[i, COLORS.index(c)] = 1.0
    return {
        "background": torch.tensor([BACKGROUNDS.index(o.background) for o in objs]),
        "shape": torch.tensor([SHAPES.index(o.shape) for o in objs]),
        "texture": torch.tensor([TEXTURES.index(o.texture) for o in objs]),
        "position": torch.tensor([tuple(POSITIONS).index(o.position) for o in objs]),
        "colors": colors,
    }


def attrnet_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits["colors"], targets["colors"])
    for k in ("background", "shape", "texture", "position"):
        loss = loss + F.cross_entropy(logits[k], targets[k])
    return loss
