#!/usr/bin/env bash
# The whole job on the embedded `toy` model (the project's own pretrained toy-world model) and
# one of its toy subjects, a pink-and-cyan striped square it has never seen:
# train atoms with the toy defaults -> sample the subject on backgrounds it was never shown on,
# beside the base model's images of the same seeds -> eval (toy CLIP + exact oracle) -> report.
# CPU only, offline, a few minutes.
set -euo pipefail
BIN=${BIN:-.venv/bin}
RUN=${RUN:-runs/demo}
SUBJECT=${SUBJECT:-data/toyworld/pink-cyan-striped-square}
SDATOM="$BIN/sdatom"

# Training is one process: give it two of the cores when there are two (torch on one thread per
# process otherwise, as the Makefile sets). The two samplings are independent: one core each.
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone obeys OMP_NUM_THREADS=1
THREADS=$(( CORES >= 2 ? 2 : 1 ))
OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
  "$SDATOM" train --model toy --subject "$SUBJECT" --class-name square --output "$RUN" --overwrite
"$SDATOM" sample --run "$RUN" --protocol -n 2 --batch-size 4 --base \
  --output "$RUN/samples/protocol-base" > "$RUN/sample-base.log" 2>&1 &
base=$!
"$SDATOM" sample --run "$RUN" --protocol -n 2 --batch-size 4 --output "$RUN/samples/protocol"
wait "$base" || { cat "$RUN/sample-base.log" >&2; exit 1; }
"$SDATOM" eval --run "$RUN"
"$BIN/python" scripts/demo_figure.py "$RUN" "$RUN/demo.png"
echo
echo "adapter: $RUN/adapter.safetensors"
if [ -f "$RUN/token_embedding.safetensors" ]; then
  echo "token:   $RUN/token_embedding.safetensors (the trained embedding of sks)"
fi
echo "picture: $RUN/demo.png (subject photos; base model | adapted, same seeds)"
echo "report:  $RUN/eval/report.html"
