"""The toy world: 32x32 pictures of one object on a flat background, and their captions.

Everything here is fixed by the world contract, so that anyone can draw, caption and check
images independently of the model:

- 32x32 RGB, a flat background and one anti-aliased object (4x4 supersampled), radius 6-8 px;
- ten palette colours; six of them are also backgrounds;
- shapes circle, square, triangle, cross; an object is solid in one colour (never the
  background's) or two-tone, striped (vertical bands, 3 px) or checkered (3 px cells);
- positions left / center / right (centre x about 9 / 16 / 23 px, y about 16 +- 3);
- captions ``a photo of a {appearance} {shape}[ on the {position}][ on a {bg} background]``.

Some objects never appear in pretraining (``is_held_out``): four solid (colour, shape) pairs for
compositional tests, every object that pairs pink with cyan (reserved for subjects), and the
(shape, texture, colour pair) combinations in ``HELD_OUT_COMBOS``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 32
SUPERSAMPLE = 4
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (255, 130, 200),
    "cyan": (40, 210, 220),
}
COLORS = tuple(PALETTE)
BACKGROUNDS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("solid", "striped", "checkered")
POSITIONS = {"left": 9.0, "center": 16.0, "right": 23.0}
RADIUS = (6.0, 8.0)
TEXTURE_CELL = 3  # px: stripe width and check size

# Held out of pretraining (see the module docstring).
HELD_OUT_SOLID = (
    ("red", "triangle"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("purple", "square"),
)
RESERVED_PAIR = frozenset({"pink", "cyan"})
HELD_OUT_COMBOS = (
    ("square", "checkered", frozenset({"yellow", "purple"})),
    ("cross", "striped", frozenset({"orange", "white"})),
    ("circle", "checkered", frozenset({"red", "blue"})),
)


@dataclass(frozen=True)
class ToyObject:
    """One world picture: the object's look and place, and the background."""

    shape: str
    colors: tuple[str, ...]  # one colour (solid) or two, in palette order (two-tone)
    texture: str  # solid | striped | checkered
    background: str
    position: str
    cx: float
    cy: float
    radius: float
    phase: int = 0  # which colour the texture starts with, and where (pixels)

    @property
    def appearance(self) -> str:
        if self.texture == "solid":
            return self.colors[0]
        return f"{self.colors[0]} and {self.colors[1]} {self.texture}"


def canonical_pair(a: str, b: str) -> tuple[str, str]:
    """A colour pair in palette order, as captions name it."""
    return tuple(sorted((a, b), key=COLORS.index))  # type: ignore[return-value]


def is_held_out(obj: ToyObject) -> bool:
    """True for objects pretraining never shows (compositional tests and subjects)."""
    if obj.texture == "solid":
        return (obj.colors[0], obj.shape) in HELD_OUT_SOLID
    pair = frozenset(obj.colors)
    if pair == RESERVED_PAIR:
        return True
    return any((obj.shape, obj.texture, pair) == combo for combo in HELD_OUT_COMBOS)


def sample_object(
    rng: random.Random,
    *,
    shape: str | None = None,
    colors: tuple[str, ...] | None = None,
    texture: str | None = None,
    background: str | None = None,
    position: str | None = None,
    allow_held_out: bool = False,
    two_tone: float = 0.4,
) -> ToyObject:
    """A random world object; fixed attributes are kept, the rest drawn uniformly.

    Without ``allow_held_out`` the draw is repeated until the object is not held out.
    """
    while True:
        bg = background or rng.choice(BACKGROUNDS)
        tex = texture or ("solid" if rng.random() >= two_tone else rng.choice(TEXTURES[1:]))
        if colors is not None:
            cols = tuple(colors)
        else:
            free = [c for c in COLORS if c != bg]
            cols = (rng.choice(free),) if tex == "solid" else canonical_pair(*rng.sample(free, 2))
        if bg in cols:
            raise ValueError(f"object colours {cols} include the background {bg!r}")
        pos = position or rng.choice(tuple(POSITIONS))
        obj = ToyObject(
            shape=shape or rng.choice(SHAPES),
            colors=cols,
            texture=tex,
            background=bg,
            position=pos,
            cx=POSITIONS[pos] + rng.uniform(-1.0, 1.0),
            cy=16.0 + rng.uniform(-3.0, 3.0),
            radius=rng.uniform(*RADIUS),
            phase=rng.randrange(2 * TEXTURE_CELL),
        )
        if allow_held_out or not is_held_out(obj):
            return obj


# ----------------------------------------------------------------------------- drawing


def _grid(size: int = SIZE, ss: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size * ss) + 0.5) / ss
    return np.meshgrid(c, c)  # x, y in pixel units


_XS, _YS = _grid()


def shape_mask(shape: str, cx: float, cy: float, r: float, xs=_XS, ys=_YS) -> np.ndarray:
    """The exact region of a shape on a (supersampled) grid: booleans."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.8 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "cross":
        a = r / 3.0
        return ((np.abs(dx) <= r) & (np.abs(dy) <= a)) | ((np.abs(dx) <= a) & (np.abs(dy) <= r))
    if shape == "triangle":  # equilateral, pointing up, circumradius r
        s3 = np.sqrt(3.0)
        return (dy <= 0.5 * r) & (s3 * dx - dy <= r) & (-s3 * dx - dy <= r)
    raise ValueError(f"unknown shape {shape!r}")


SHAPE_AREA = {"circle": np.pi, "square": 2.56, "cross": 20.0 / 9.0, "triangle": 3 * np.sqrt(3) / 4}


def texture_index(texture: str, phase: int, xs=_XS, ys=_YS) -> np.ndarray:
    """Which of the two colours each point takes (0 or 1); all 0 when solid."""
    if texture == "solid":
        return np.zeros(xs.shape, dtype=np.int64)
    col = np.floor((xs + phase) / TEXTURE_CELL).astype(np.int64)
    if texture == "striped":
        return col % 2
    row = np.floor((ys + phase) / TEXTURE_CELL).astype(np.int64)
    return (col + row) % 2


def draw(obj: ToyObject) -> Image.Image:
    """The 32x32 picture of ``obj`` (deterministic, anti-aliased by 4x4 supersampling)."""
    rgb = np.empty(_XS.shape + (3,), dtype=np.float64)
    rgb[:] = PALETTE[obj.background]
    mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.radius)
    palette = np.array([PALETTE[c] for c in obj.colors], dtype=np.float64)
    index = texture_index(obj.texture, obj.phase) if len(obj.colors) > 1 else 0
    colour = palette[index] if len(obj.colors) > 1 else palette[0]
    rgb[mask] = colour[mask] if len(obj.colors) > 1 else colour
    ss = SUPERSAMPLE
    small = rgb.reshape(SIZE, ss, SIZE, ss, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions


def caption(
    obj: ToyObject,
    *,
    appearance: bool = True,
    position: bool = True,
    background: bool = True,
    subject: str | None = None,
) -> str:
    """The caption of ``obj``; ``subject`` (e.g. ``sks``) names it instead of its appearance."""
    if subject is not None:
        text = f"a photo of {subject} {obj.shape}"
    elif appearance:
        text = f"a photo of a {obj.appearance} {obj.shape}"
    else:
        text = f"a photo of a {obj.shape}"
    if position:
        text += f" on the {obj.position}"
    if background:
        text += f" on a {obj.background} background"
    return text


def random_caption(obj: ToyObject, rng: random.Random) -> str:
    """A pretraining caption: appearance dropped 15 %, position 25 %, background 10 %."""
    return caption(
        obj,
        appearance=rng.random() >= 0.15,
        position=rng.random() >= 0.25,
        background=rng.random() >= 0.10,
    )


def prompt(
    shape: str,
    *,
    appearance: str | None = None,
    position: str | None = None,
    background: str | None = None,
    subject: str | None = None,
) -> str:
    """A caption from attribute words alone (for sampling prompts)."""
    if subject is not None:
        text = f"a photo of {subject} {shape}"
    else:
        text = f"a photo of a {appearance + ' ' if appearance else ''}{shape}"
    if position:
        text += f" on the {position}"
    if background:
        text += f" on a {background} background"
    return text


def world_batch(
    seed: int, n: int, two_tone: float = 0.4
) -> tuple[list[Image.Image], list[str], list[ToyObject]]:
    """``n`` held-in world pictures and captions, a pure function of ``seed`` (resumable);
    ``two_tone`` is the share of striped or checkered objects."""
    rng = random.Random(seed)
    objs = [sample_object(rng, two_tone=two_tone) for _ in range(n)]
    return [draw(o) for o in objs], [random_caption(o, rng) for o in objs], objs


_COLOR_RE = "|".join(COLORS)
_PROMPT = re.compile(
    rf"^a photo of (?:(?!a )(?P<token>\S+) |a (?:(?P<c1>{_COLOR_RE}) and (?P<c2>{_COLOR_RE}) "
    rf"(?P<tex>striped|checkered) |(?P<solid>{_COLOR_RE}) )?)"
    rf"(?P<shape>{'|'.join(SHAPES)})"
    rf"(?: on the (?P<pos>left|center|right))?"
    rf"(?: on a (?P<bg>{'|'.join(BACKGROUNDS)}) background)?$"
)


@dataclass(frozen=True)
class ParsedPrompt:
    """What a caption in the world's language asks for (None: not said)."""

    shape: str
    token: str | None
    appearance: str | None
    position: str | None
    background: str | None


def parse_prompt(text: str) -> ParsedPrompt | None:
    """Parse a caption of the world's language; None for any other text."""
    m = _PROMPT.match(" ".join(text.split()))
    if m is None:
        return None
    if m["tex"]:
        look = f"{' and '.join(canonical_pair(m['c1'], m['c2']))} {m['tex']}"
    else:
        look = m["solid"]
    return ParsedPrompt(m["shape"], m["token"], look, m["pos"], m["bg"])
