"""Draw sdatom's demo subject: a red-and-yellow toy robot, five 128 px photos.

The images are procedural (PIL.ImageDraw only, no downloads) and deterministic: running

    python scripts/make_demo_subject.py            # writes data/toy/00.png ... 04.png

again gives byte-identical files. Each view varies the background scene, the robot's position,
scale and arm pose, so the subject is recognisable but not a copy of one picture.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
RED = (214, 40, 40)
DARK_RED = (150, 22, 28)
YELLOW = (250, 204, 21)
STEEL = (70, 78, 92)
CYAN = (80, 220, 240)

# (sky/wall colour, floor colour, scene kind, centre x, floor y, scale, arms up)
VIEWS = [
    ((186, 222, 250), (120, 180, 90), "hills", 0.50, 0.86, 1.00, False),
    ((245, 236, 220), (150, 105, 70), "table", 0.38, 0.90, 0.80, True),
    ((40, 44, 80), (60, 60, 70), "stars", 0.62, 0.88, 0.90, False),
    ((255, 230, 235), (235, 190, 200), "checks", 0.45, 0.80, 0.65, True),
    ((210, 240, 220), (240, 240, 235), "plain", 0.56, 0.94, 1.15, False),
]


def _background(draw: ImageDraw.ImageDraw, sky, floor, kind: str, floor_y: int, rng) -> None:
    draw.rectangle((0, 0, SIZE, floor_y), fill=sky)
    draw.rectangle((0, floor_y, SIZE, SIZE), fill=floor)
    if kind == "hills":
        draw.ellipse((-40, floor_y - 30, 70, floor_y + 40), fill=(95, 160, 75))
        draw.ellipse((50, floor_y - 22, 170, floor_y + 50), fill=(80, 145, 65))
        draw.ellipse((96, 10, 118, 32), fill=(255, 236, 140))
    elif kind == "table":
        draw.rectangle((0, floor_y - 4, SIZE, floor_y), fill=(110, 75, 50))
        draw.rectangle((86, 30, 118, 62), outline=(120, 120, 120), width=3, fill=(200, 225, 240))
    elif kind == "stars":
        for _ in range(18):
            x, y = rng.randrange(SIZE), rng.randrange(floor_y - 8)
            draw.point((x, y), fill=(255, 255, 255))
        draw.ellipse((14, 12, 34, 32), fill=(230, 230, 210))
    elif kind == "checks":
        step = 16
        for yy in range(floor_y, SIZE, step // 2):
            for xx in range(0, SIZE, step):
                off = step // 2 if (yy // (step // 2)) % 2 else 0
                draw.rectangle((xx + off, yy, xx + off + step // 2 - 1, yy + step // 2 - 1),
                               fill=(200, 150, 165))  # fmt: skip
    # "plain": the two-colour studio backdrop only


def _robot(draw: ImageDraw.ImageDraw, cx: int, floor_y: int, s: float, arms_up: bool) -> None:
    def box(x0, y0, x1, y1, **kw):
        draw.rectangle((cx + x0 * s, floor_y - y1 * s, cx + x1 * s, floor_y - y0 * s), **kw)

    box(-14, 0, -4, 16, fill=STEEL)  # legs
    box(4, 0, 14, 16, fill=STEEL)
    box(-18, 0, -2, 4, fill=DARK_RED)  # feet
    box(2, 0, 18, 4, fill=DARK_RED)
    box(-20, 16, 20, 52, fill=RED, outline=DARK_RED, width=max(1, round(2 * s)))  # body
    box(-10, 26, 10, 42, fill=YELLOW)  # chest panel
    draw.ellipse((cx - 4 * s, floor_y - 38 * s, cx + 4 * s, floor_y - 30 * s), fill=RED)
    arm_y = (46, 70) if arms_up else (22, 48)
    box(-28, arm_y[0], -20, arm_y[1], fill=YELLOW)  # arms
    box(20, arm_y[0], 28, arm_y[1], fill=YELLOW)
    box(-16, 52, 16, 78, fill=YELLOW, outline=(200, 150, 0), width=max(1, round(2 * s)))  # head
    box(-10, 62, -3, 70, fill=CYAN)  # eyes
    box(3, 62, 10, 70, fill=CYAN)
    box(-1, 78, 1, 88, fill=STEEL)  # antenna
    draw.ellipse((cx - 4 * s, floor_y - 93 * s, cx + 4 * s, floor_y - 85 * s), fill=RED)


def make_images(out_dir: Path, seed: int = 0) -> list[Path]:
    """Draw the demo views into ``out_dir`` as ``NN.png`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, (sky, floor, kind, cx, fy, scale, arms_up) in enumerate(VIEWS):
        img = Image.new("RGB", (SIZE, SIZE))
        draw = ImageDraw.Draw(img)
        floor_y = round(fy * SIZE)
        _background(draw, sky, floor, kind, floor_y - round(6 * scale), rng)
        _robot(draw, round(cx * SIZE), floor_y, scale, arms_up)
        path = out_dir / f"{i:02d}.png"
        img.save(path, optimize=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "data" / "toy"
    parser.add_argument("--out", type=Path, default=default_out, help="Folder to write into.")
    args = parser.parse_args()
    paths = make_images(args.out)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images ({total / 1024:.1f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
