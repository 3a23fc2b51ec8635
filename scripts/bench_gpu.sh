#!/usr/bin/env bash
# GPU table of BENCHMARKS.md (not run yet: no GPU was lent to the session that wrote it).
# One call on a GPU machine, from the repository root, prints one JSON object per line:
#   bash scripts/bench_gpu.sh > gpu.jsonl
# Random-weight SD-1.5 UNet at 512 px, batch 1, fp16 and bf16, every method of bench_train.py.
# Peak memory comes from torch.cuda.max_memory_allocated (rise over the step's start).
# Note: on CUDA the atoms keep the generic path (cuDNN); sdatom/atoms/gemm.py's CPU-only
# im2col path is not used there, the 1×1 "scalar" path is.
set -euo pipefail
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
for dtype in fp16 bf16; do
  "$PY" scripts/bench_train.py --device cuda --dtype "$dtype" --res 512 --json
done
"$PY" scripts/bench_train.py --device cuda --dtype fp16 --res 128 --json
