"""The demo's picture: the subject's photos, then base vs adapted samples of the same seeds.

    python scripts/demo_figure.py RUN_DIR OUT.png

Reads ``RUN/samples/protocol`` and ``RUN/samples/protocol-base`` (written by ``make demo``):
one row per subject prompt, the base model's images on the left and the adapted model's with
the same seeds on the right, every picture enlarged 4x without smoothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from sdatom.data import find_images

SCALE = 4
PAD = 6


def main(run: Path, out: Path) -> None:
    adapted, base = run / "samples" / "protocol", run / "samples" / "protocol-base"
    config = yaml.safe_load((run / "config.yaml").read_text())
    token = config.get("token", "sks")
    entries = json.loads((adapted / "manifest.json").read_text())["images"]
    rows: dict[str, list[str]] = {}
    for e in entries:
        if f" {token} " in f" {e['prompt']} ":
            rows.setdefault(e["prompt"], []).append(e["file"])
    subject = [Image.open(p).convert("RGB") for p in find_images(config["subject"])]
    cell = 32 * SCALE
    per_row = max(len(v) for v in rows.values())
    label_h = 14
    columns = max(2 * per_row, len(subject))  # the photos' row can be the widest
    width = PAD + columns * (cell + PAD) + PAD
    height = PAD + (label_h + cell + PAD) * (len(rows) + 1)
    sheet = Image.new("RGB", (width + 2 * PAD, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def put(img: Image.Image, x: int, y: int) -> None:
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))

    y = PAD
    draw.text((PAD, y), "subject photos (training images)", fill=(0, 0, 0))
    for i, img in enumerate(subject):
        put(img, PAD + i * (cell + PAD), y + label_h)
    y += label_h + cell + PAD
    for prompt, files in rows.items():
        draw.text((PAD, y), f"base model | adapted, same seeds:  {prompt}", fill=(0, 0, 0))
        for i, f in enumerate(files):
            put(Image.open(base / f), PAD + i * (cell + PAD), y + label_h)
            put(Image.open(adapted / f), PAD + (per_row + i) * (cell + PAD) + PAD, y + label_h)
        y += label_h + cell + PAD
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
