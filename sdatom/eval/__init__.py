"""Evaluation: DreamBench metrics, the HTML report and run comparison.

Names are imported lazily, so ``from sdatom.eval import compare`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly (it needs no torch): the function shares its module's name, and a lazy
# import would leave the package attribute bound to the submodule.
from sdatom.eval.compare import compare

__all__ = [
    "Backbones",
    "clip_i",
    "clip_t",
    "compare",
    "dino_score",
    "evaluate",
    "format_table",
    "load_backbones",
    "lpips_diversity",
    "read_generated",
    "same_seed_similarity",
    "vendi_score",
    "write_report",
]

_WHERE = {
    "Backbones": "backbones",
    "load_backbones": "backbones",
    "clip_i": "metrics",
    "clip_t": "metrics",
    "dino_score": "metrics",
    "evaluate": "metrics",
    "format_table": "metrics",
    "lpips_diversity": "metrics",
    "same_seed_similarity": "metrics",
    "vendi_score": "metrics",
    "read_generated": "images",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
