"""Toy subjects: held-out objects with a few instance pictures, laid out like DreamBench.

Each subject is a (shape, texture, colour pair) that pretraining never showed, drawn 5 times on
3 backgrounds; its class word is its shape. All eight pink-and-cyan objects are subjects, and so
are the other combinations in :data:`world.HELD_OUT_COMBOS`. A subject folder needs no side file:
the oracle reads the subject and the backgrounds it was shown on back from its pictures.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdatom.toyworld import oracle, world

INSTANCE_IMAGES = 5
INSTANCE_BACKGROUNDS = 3
_POSITIONS = ("center", "left", "right", "right", "center")


@dataclass(frozen=True)
class ToySubject:
    """A held-out object, the class word it belongs to and the backgrounds it is shown on."""

    shape: str
    texture: str
    colors: tuple[str, str]
    backgrounds: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.colors[0]}-{self.colors[1]}-{self.texture}-{self.shape}"

    @property
    def class_name(self) -> str:
        return self.shape

    @property
    def appearance(self) -> str:
        return f"{self.colors[0]} and {self.colors[1]} {self.texture}"

    def objects(self) -> list[world.ToyObject]:
        """The instance pictures' objects (deterministic per subject)."""
        rng = random.Random(self.name)
        return [
            world.sample_object(
                rng,
                shape=self.shape,
                colors=self.colors,
                texture=self.texture,
                background=self.backgrounds[i % len(self.backgrounds)],
                position=_POSITIONS[i],
                allow_held_out=True,
            )
            for i in range(INSTANCE_IMAGES)
        ]


def _subjects() -> tuple[ToySubject, ...]:
    combos = [
        (s, t, frozenset(world.RESERVED_PAIR))
        for t in ("striped", "checkered")
        for s in world.SHAPES
    ]
    combos += list(world.HELD_OUT_COMBOS)
    out = []
    for i, (shape, texture, pair) in enumerate(combos):
        colors = world.canonical_pair(*pair)
        bgs = [b for b in world.BACKGROUNDS if b not in colors]
        start = (3 * i) % len(bgs)
        chosen = tuple((bgs + bgs)[start : start + INSTANCE_BACKGROUNDS])
        out.append(ToySubject(shape, texture, colors, chosen))
    return tuple(out)


#: Every toy subject, in a fixed order (the pink-and-cyan ones first).
SUBJECTS: tuple[ToySubject, ...] = _subjects()


def subject(name: str) -> ToySubject:
    for s in SUBJECTS:
        if s.name == name:
            return s
    raise KeyError(f"no toy subject {name!r}: one of {', '.join(s.name for s in SUBJECTS)}")


def write_subject(s: ToySubject, folder: str | os.PathLike) -> Path:
    """Draw the subject's instance pictures into ``folder`` (00.png, 01.png, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, obj in enumerate(s.objects()):
        world.draw(obj).save(folder / f"{i:02d}.png")
    return folder


def write_subjects(root: str | os.PathLike) -> list[Path]:
    return [write_subject(s, Path(root) / s.name) for s in SUBJECTS]


def read_subject(images: list[Image.Image | str | os.PathLike]) -> ToySubject | None:
    """The subject shown in instance pictures, as the oracle reads them (None if unreadable).

    Shape, texture and colours are the majority reading; backgrounds are all those seen.
    """
    readings = [
        oracle.read(Image.open(im) if not isinstance(im, Image.Image) else im) for im in images
    ]
    looks = Counter((r.shape, r.texture, r.colors) for r in readings if r.shape is not None)
    if not looks:
        return None
    (shape, texture, colors), _ = looks.most_common(1)[0]
    if texture == "solid" or colors is None:
        colors = (colors[0], colors[0]) if colors else ("", "")
    bgs = tuple(dict.fromkeys(r.background for r in readings))
    return ToySubject(shape, texture, tuple(colors), bgs)  # type: ignore[arg-type]


def protocol(s: ToySubject, token: str = "sks") -> list[tuple[str, str]]:
    """The toy evaluation prompts of a subject, each with its role.

    ``subject``: the subject on every background it was not shown on, at every position;
    ``class``: the class word without the token on the same backgrounds (drift).
    """
    unseen = [b for b in world.BACKGROUNDS if b not in s.backgrounds and b not in s.colors]
    out = [
        (world.prompt(s.shape, subject=token, position=p, background=b), "subject")
        for b in unseen
        for p in world.POSITIONS
    ]
    out += [(world.prompt(s.shape, background=b), "class") for b in unseen]
    return out


if __name__ == "__main__":  # python -m sdatom.toyworld.subjects OUT_DIR
    import sys

    for path in write_subjects(sys.argv[1] if len(sys.argv) > 1 else "data/toyworld"):
        print(path)
