"""The exact oracle: read a toy-world picture back into its attributes.

It needs no training and reads generated pictures too (which are blurrier than drawn ones):

- background: the median of the border pixels, snapped to the nearest background colour;
- object: the pixels far from the background colour; position from their centroid;
- colours: the palette colours of the object's interior (eroded mask), one or two;
- texture: for two colours, whether the colour depends on the column alone (striped) or not
  (checkered);
- shape: the shape whose exact region, fitted to the object's centroid and area, overlaps
  the object best (intersection over union).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdatom.toyworld.world import (
    BACKGROUNDS,
    COLORS,
    PALETTE,
    POSITIONS,
    SHAPE_AREA,
    SHAPES,
    SIZE,
    ToyObject,
    _grid,
    canonical_pair,
    shape_mask,
)

_PAL = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)
_BG = np.array([PALETTE[c] for c in BACKGROUNDS], dtype=np.float64)
_OBJECT_DISTANCE = 60.0  # RGB distance from the background that counts as object
_MIN_AREA = 12  # px: fewer object pixels means "no object"
_SECOND_COLOUR = 0.2  # share of the interior a second colour needs to make it two-tone
_STRIPE_PURITY = 0.8
_XS2, _YS2 = _grid(SIZE, 2)


@dataclass(frozen=True)
class Reading:
    """What the oracle saw; attributes are None when there is no object to read."""

    background: str
    shape: str | None
    colors: tuple[str, ...] | None
    texture: str | None
    position: str | None
    area: int

    @property
    def appearance(self) -> str | None:
        if self.colors is None:
            return None
        if self.texture == "solid":
            return self.colors[0]
        return f"{self.colors[0]} and {self.colors[1]} {self.texture}"

    def matches(self, obj: ToyObject) -> dict[str, bool]:
        """Per attribute, whether this reading agrees with the drawn object."""
        return {
            "background": self.background == obj.background,
            "shape": self.shape == obj.shape,
            "appearance": self.appearance == obj.appearance,
            "position": self.position == obj.position,
        }


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    d = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    return d.argmin(1)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:, :] &= mask[:-1, :]
    m[:-1, :] &= mask[1:, :]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def read(image: Image.Image | np.ndarray) -> Reading:
    """Read one picture (any size: it is resized to 32x32 first)."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.BILINEAR)
        image = np.asarray(image)
    px = np.asarray(image, dtype=np.float64)
    border = np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    bg = BACKGROUNDS[int(_nearest(bg_rgb[None], _BG)[0])]
    mask = np.sqrt(((px - np.array(PALETTE[bg])) ** 2).sum(-1)) > _OBJECT_DISTANCE
    area = int(mask.sum())
    if area < _MIN_AREA:
        return Reading(bg, None, None, None, None, area)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    edges = np.array(
        [
            (POSITIONS["left"] + POSITIONS["center"]) / 2,
            (POSITIONS["center"] + POSITIONS["right"]) / 2,
        ]
    )
    position = ("left", "center", "right")[int(np.searchsorted(edges, cx))]
    colors, texture = _appearance(px, mask, bg)
    return Reading(bg, _shape(mask, cx, cy, area), colors, texture, position, area)


def _appearance(px: np.ndarray, mask: np.ndarray, bg: str) -> tuple[tuple[str, ...], str]:
    core = _erode(mask)
    if core.sum() < 4:
        core = mask
    labels = _nearest(px[core], _PAL)
    counts = np.bincount(labels, minlength=len(COLORS)).astype(np.float64)
    counts[COLORS.index(bg)] = 0  # blends towards the background are edges, not colours
    order = counts.argsort()[::-1]
    first, second = COLORS[order[0]], COLORS[order[1]]
    if counts[order[1]] < _SECOND_COLOUR * max(counts.sum(), 1):
        return (first,), "solid"
    pair = canonical_pair(first, second)
    # Which of the two each interior pixel is; purity of columns tells stripes from checks.
    two = np.array([PALETTE[pair[0]], PALETTE[pair[1]]], dtype=np.float64)
    which = np.full(mask.shape, -1)
    which[core] = _nearest(px[core], two)
    agree = total = 0
    for col in which.T:
        vals = col[col >= 0]
        if len(vals) >= 2:
            agree += max((vals == 0).sum(), (vals == 1).sum())
            total += len(vals)
    purity = agree / max(total, 1)
    return pair, ("striped" if purity >= _STRIPE_PURITY else "checkered")


def _shape(mask: np.ndarray, cx: float, cy: float, area: int) -> str:
    # Compare at 2x supersampling: the object mask upsampled, each shape's exact region
    # with the radius that gives the object's area.
    big = np.repeat(np.repeat(mask, 2, 0), 2, 1)
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        r = float(np.sqrt(area / SHAPE_AREA[shape]))
        iou = 0.0
        for dr in (0.9, 1.0, 1.1):
            tmpl = shape_mask(shape, cx, cy, r * dr, _XS2, _YS2)
            inter = (tmpl & big).sum()
            iou = max(iou, inter / max((tmpl | big).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best
