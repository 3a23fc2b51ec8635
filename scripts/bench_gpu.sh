#!/usr/bin/env bash
# The GPU checks of issues 10 and 14 (BENCHMARKS.md, "GPU table"): one call on a CUDA machine,
# from the repository root, about 10 minutes on an H200; prints one JSON object per line: the
# random:sd15 512 px step table (frozen, atoms, atoms-attn, lora-attn, lora-conv) in fp16 and
# bf16 autocast with CUDA peak memory, the ratios, the measured kernel choices, then the checks:
#   bash scripts/bench_gpu.sh > gpu.jsonl
# Every step is what `sdatom train` does (frozen weights in fp16/bf16, trainable parameters in
# fp32, torch.autocast, GradScaler for fp16): see scripts/bench_gpu.py for the checks.
set -euo pipefail
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
timeout 590 "$PY" scripts/bench_gpu.py
