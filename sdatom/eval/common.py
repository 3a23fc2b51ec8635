"""Metric names, labels and scales shared by metrics, report and compare (no torch here)."""

from __future__ import annotations

import html
import math

__all__ = [
    "FORMAT",
    "METRICS",
    "PAGE_CSS",
    "RANDOM_WARNING",
    "fmt",
    "metric_label",
    "random_banner",
]

#: Tag of the metrics.json layout.
FORMAT = "sdatom-eval/1"

RANDOM_WARNING = "RANDOM BACKBONES — these numbers mean nothing about quality"

#: (key, label, what it measures and on which scale), in the order tables show them.
METRICS: tuple[tuple[str, str, str], ...] = (
    (
        "clip_t",
        "CLIP-T",
        "prompt-image CLIP cosine, placeholder token removed; raw cosine (~0.3), "
        "not x100 as torchmetrics' CLIPScore; higher = follows the prompt",
    ),
    (
        "clip_i",
        "CLIP-I",
        "mean pairwise CLIP image cosine, generated vs subject photos; higher = more like "
        "the subject",
    ),
    (
        "dino",
        "DINO",
        "mean pairwise DINO ViT-S/16 (CLS) cosine, generated vs subject photos; higher = "
        "more like the subject",
    ),
    (
        "lpips_diversity",
        "DIV (LPIPS)",
        "mean pairwise LPIPS distance among images of the same prompt, averaged over "
        "prompts; higher = more diverse",
    ),
    (
        "vendi_clip",
        "Vendi (CLIP)",
        "Vendi score of CLIP image embeddings per prompt (1 = all alike, n = all "
        "orthogonal), averaged over prompts",
    ),
    (
        "vendi_dino",
        "Vendi (DINO)",
        "Vendi score of DINO embeddings per prompt, averaged over prompts",
    ),
    (
        "preserve_clip_i",
        "Preserve CLIP-I",
        "CLIP image cosine between the adapted and the base model's image with the same "
        "prompt and seed; higher = base model better preserved",
    ),
    (
        "preserve_dino",
        "Preserve DINO",
        "DINO cosine between the adapted and the base model's same-prompt, same-seed image",
    ),
    # Toy-world runs only (--model toy): read by the exact oracle, no backbone involved.
    (
        "oracle_fidelity",
        "Oracle fidelity",
        "toy world: share of subject-prompt images whose object has the subject's shape, "
        "colours and texture (exact oracle)",
    ),
    (
        "oracle_alignment",
        "Oracle alignment",
        "toy world: share of subject-prompt images with the prompted background and position",
    ),
    (
        "oracle_alignment_background",
        "Oracle alignment (background)",
        "toy world: share of subject-prompt images with the prompted background",
    ),
    (
        "oracle_alignment_position",
        "Oracle alignment (position)",
        "toy world: share of subject-prompt images with the prompted position",
    ),
    (
        "oracle_drift",
        "Oracle drift",
        "toy world: share of class-prompt images (no token) that show the subject; lower = "
        "less drift",
    ),
    (
        "oracle_class_diversity",
        "Oracle class diversity",
        "toy world: chance that two class-prompt images differ in appearance (Gini-Simpson)",
    ),
    (
        "oracle_world",
        "Oracle world knowledge",
        "toy world: attribute accuracy on ordinary world prompts",
    ),
)


def metric_label(key: str) -> str:
    """The display label of a metric key (the key itself if unknown)."""
    for name, label, _ in METRICS:
        if name == key:
            return label
    return key


def fmt(value: object, digits: int = 4) -> str:
    """A metric value for tables: fixed digits, '—' for missing/NaN."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #222; background: #fafafa; }
h1 { margin-bottom: 4px; } .sub { color: #555; margin-top: 0; }
.banner { background: #c00; color: #fff; font-size: 28px; font-weight: 800; padding: 18px;
          text-align: center; border-radius: 6px; margin: 12px 0 20px; letter-spacing: .5px; }
table { border-collapse: collapse; margin: 8px 0 16px; background: #fff; }
th, td { border: 1px solid #ddd; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 4px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 4px; border-radius: 4px; }
figure img { display: block; width: 200px; height: auto; }
figcaption { font-size: 12px; color: #444; max-width: 200px; }
.scores { color: #333; font-size: 14px; } .note { color: #7a5200; font-size: 14px; }
section.prompt { border-top: 1px solid #ddd; padding-top: 8px; margin-top: 16px; }
img.plot { max-width: 100%; border: 1px solid #ddd; background: #fff; }
"""


def random_banner() -> str:
    """The big red banner shown on pages built from random-weight backbones."""
    return f'<div class="banner">{html.escape(RANDOM_WARNING)}</div>'
