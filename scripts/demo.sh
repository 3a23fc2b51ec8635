#!/usr/bin/env bash
# The end-to-end demo on the embedded `tiny` model: build it, generate one image.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
"$BIN/sdatom" inspect --model tiny
"$BIN/python" - "$OUT" <<'PY'
import sys, torch
from sdatom.models import load_pipeline
pipe = load_pipeline("tiny")
image = pipe("a photo of sks toy", num_inference_steps=4,
             generator=torch.Generator().manual_seed(0)).images[0]
path = f"{sys.argv[1]}/tiny.png"
image.save(path)
print(f"image: {path}")
PY
