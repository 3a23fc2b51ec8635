#!/usr/bin/env bash
# The whole job on the embedded `tiny` model and the project's demo subject (data/toy):
# train atoms -> sample the evaluation prompts (adapted and base, same seeds) -> eval -> report.
# CPU only, offline, a few minutes. Random weights: the pictures are noise-like by design.
set -euo pipefail
BIN=${BIN:-.venv/bin}
RUN=${RUN:-runs/demo}
SDATOM="$BIN/sdatom"

"$SDATOM" train --subject data/toy --class-name toy --model tiny --output "$RUN" \
    --steps 40 --lr 1e-3 --checkpoint-every 20 --validation-every 20 --overwrite
"$SDATOM" sample --run "$RUN" --protocol -n 2 --steps 8 --output "$RUN/samples/protocol"
"$SDATOM" sample --run "$RUN" --protocol -n 2 --steps 8 --base --output "$RUN/samples/protocol-base"
"$SDATOM" eval --run "$RUN" --random-backbones --device cpu
echo
echo "adapter: $RUN/adapter.safetensors"
echo "images:  $RUN/samples/protocol/grid.png"
echo "report:  $RUN/eval/report.html"
