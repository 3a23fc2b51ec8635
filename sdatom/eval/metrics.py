"""DreamBench metrics (CLIP-T, CLIP-I, DINO, LPIPS diversity), Vendi score, base preservation.

Conventions (DreamBooth paper, LyCORIS' evaluation):

- CLIP-T: cosine between the CLIP embeddings of the prompt (placeholder token removed) and the
  image. Raw cosine (~0.3), not x100 as torchmetrics' CLIPScore.
- CLIP-I / DINO: mean pairwise cosine between generated images and subject photos.
- DIV: mean pairwise LPIPS distance among the images of one prompt.
- Vendi: exp of the entropy of the eigenvalues of K/n, K the cosine-similarity kernel of the
  image embeddings of one prompt.
- Preservation: cosine between the adapted and the base model's image made from the same
  prompt and seed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import sdatom
from sdatom.data import find_images, load_image
from sdatom.errors import UsageError
from sdatom.eval.backbones import Backbones, load_backbones
from sdatom.eval.common import FORMAT, METRICS, RANDOM_WARNING, fmt
from sdatom.eval.images import GeneratedImage, read_generated, read_manifest_settings
from sdatom.fileio import atomic_write_text
from sdatom.progress import progress_bar
from sdatom.prompts import strip_token

__all__ = [
    "clip_i",
    "clip_image_embeddings",
    "clip_t",
    "clip_text_embeddings",
    "dino_embeddings",
    "dino_score",
    "evaluate",
    "format_table",
    "lpips_diversity",
    "mean_pairwise_cosine",
    "same_seed_similarity",
    "vendi_score",
]

_BATCH = 16
LPIPS_SIZE = 256


# --------------------------------------------------------------------------- embeddings


def _as_images(images: Sequence[Image.Image | str | os.PathLike]) -> list[Image.Image]:
    return [im.convert("RGB") if isinstance(im, Image.Image) else load_image(im) for im in images]


@torch.no_grad()
def _embed(
    images: Sequence[Image.Image | str | os.PathLike],
    preprocess: Callable,
    encode: Callable[[torch.Tensor], torch.Tensor],
    device: str,
) -> torch.Tensor:
    pil = _as_images(images)
    if not pil:
        raise ValueError("no images to embed")
    out = []
    for start in range(0, len(pil), _BATCH):
        batch = torch.stack([preprocess(im) for im in pil[start : start + _BATCH]]).to(device)
        out.append(encode(batch).float().cpu())
    return F.normalize(torch.cat(out), dim=-1)


def clip_image_embeddings(
    backbones: Backbones, images: Sequence[Image.Image | str | os.PathLike]
) -> torch.Tensor:
    """L2-normalised CLIP image embeddings, shape (n, d), float32 on the CPU."""
    return _embed(images, backbones.clip_preprocess, backbones.clip.encode_image, backbones.device)


def dino_embeddings(
    backbones: Backbones, images: Sequence[Image.Image | str | os.PathLike]
) -> torch.Tensor:
    """L2-normalised DINO ViT-S/16 CLS embeddings (last layer, after the final norm)."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        return backbones.dino(pixel_values=x).last_hidden_state[:, 0]

    return _embed(images, backbones.dino_preprocess, encode, backbones.device)


@torch.no_grad()
def clip_text_embeddings(backbones: Backbones, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings of ``texts`` (used as given), shape (n, d)."""
    tokens = backbones.clip_tokenizer(list(texts)).to(backbones.device)
    return F.normalize(backbones.clip.encode_text(tokens).float().cpu(), dim=-1)


# --------------------------------------------------------------------------- metrics


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs (row of ``a``, row of ``b``)."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    return float((a @ b.T).mean())


def clip_t(
    backbones: Backbones,
    images: Sequence[Image.Image | str | os.PathLike],
    prompts: str | Sequence[str],
    *,
    token: str | None = "sks",
) -> list[float]:
    """CLIP-T of each image against its prompt (one prompt for all, or one per image).

    The placeholder ``token`` is removed from the prompt first (:func:`sdatom.prompts.strip_token`);
    ``token=None`` keeps the prompt as is. Raw cosine, not x100.
    """
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    texts = [strip_token(p, token) if token else p for p in prompts]
    img = clip_image_embeddings(backbones, images)
    txt = clip_text_embeddings(backbones, texts)
    return [float(v) for v in (img * txt).sum(-1)]


def clip_i(
    backbones: Backbones,
    generated: Sequence[Image.Image | str | os.PathLike],
    references: Sequence[Image.Image | str | os.PathLike],
) -> float:
    """CLIP-I: mean pairwise CLIP image cosine between generated images and subject photos."""
    return mean_pairwise_cosine(
        clip_image_embeddings(backbones, generated), clip_image_embeddings(backbones, references)
    )


def dino_score(
    backbones: Backbones,
    generated: Sequence[Image.Image | str | os.PathLike],
    references: Sequence[Image.Image | str | os.PathLike],
) -> float:
    """DINO: mean pairwise DINO cosine between generated images and subject photos."""
    return mean_pairwise_cosine(
        dino_embeddings(backbones, generated), dino_embeddings(backbones, references)
    )


def _lpips_tensor(img: Image.Image, size: int) -> torch.Tensor:
    # Shorter side to `size`, centre crop, values in [-1, 1] (what LPIPS expects).
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


@torch.no_grad()
def lpips_diversity(
    backbones: Backbones,
    images: Sequence[Image.Image | str | os.PathLike],
    *,
    size: int = LPIPS_SIZE,
) -> float | None:
    """Mean LPIPS distance over all pairs of ``images`` (None for fewer than 2 images).

    Images are resized (shorter side ``size``) and centre-cropped first.

    Raises:
        UsageError: the backbones have no LPIPS network (its trunk weights are missing).
    """
    if backbones.lpips is None:
        raise UsageError(backbones.lpips_note or "LPIPS is not available")
    pil = _as_images(images)
    if len(pil) < 2:
        return None
    x = torch.stack([_lpips_tensor(im, size) for im in pil])
    i, j = torch.triu_indices(len(pil), len(pil), offset=1)
    distances = []
    for start in range(0, len(i), _BATCH):
        a = x[i[start : start + _BATCH]].to(backbones.device)
        b = x[j[start : start + _BATCH]].to(backbones.device)
        distances.append(backbones.lpips(a, b).flatten().float().cpu())
    return float(torch.cat(distances).double().mean())


def vendi_score(embeddings: torch.Tensor) -> float:
    """Vendi score: exp(entropy of the eigenvalues of K/n), K the cosine-similarity kernel.

    1 when all embeddings point the same way, n when they are mutually orthogonal.
    """
    x = torch.as_tensor(embeddings).double()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (n, d) matrix, got {tuple(x.shape)}")
    x = F.normalize(x, dim=-1)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp(min=0.0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    eigenvalues = eigenvalues / eigenvalues.sum()
    entropy = -(eigenvalues * eigenvalues.log()).sum()
    return float(entropy.exp())


def same_seed_similarity(
    backbones: Backbones,
    adapted: Sequence[Image.Image | str | os.PathLike],
    base: Sequence[Image.Image | str | os.PathLike],
) -> dict[str, list[float]]:
    """Cosine between each adapted image and its base-model twin (same prompt and seed).

    Returns ``{"clip_i": [...], "dino": [...]}``, one value per pair, in order.
    """
    if len(adapted) != len(base):
        raise ValueError(f"{len(adapted)} adapted images but {len(base)} base images")
    clip_a, clip_b = (
        clip_image_embeddings(backbones, adapted),
        clip_image_embeddings(backbones, base),
    )
    dino_a, dino_b = dino_embeddings(backbones, adapted), dino_embeddings(backbones, base)
    return {
        "clip_i": [float(v) for v in (clip_a * clip_b).sum(-1)],
        "dino": [float(v) for v in (dino_a * dino_b).sum(-1)],
    }


# --------------------------------------------------------------------------- evaluate


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _group_by_prompt(images: list[GeneratedImage]) -> dict[str, list[int]]:
    """Prompt -> indices of its images, prompts in prompt_index (else first-seen) order."""
    groups: dict[str, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.prompt, []).append(i)

    def key(prompt: str) -> tuple[int, int]:
        first = groups[prompt][0]
        index = images[first].prompt_index
        return (index if index is not None else 1 << 30, first)

    return {p: groups[p] for p in sorted(groups, key=key)}


def _read_run_info(out_dir: Path, images_dir: Path) -> dict:
    """Run name/method/model from the run folder around ``out_dir`` (``runs/<name>/eval``)."""
    from sdatom.runs import find_run

    run = find_run(out_dir.parent, images_dir.parent)
    if run is None:
        return {}
    keys = ("method", "preset", "model", "token", "class_name", "trainable_params")
    return {"name": run.name, "dir": str(run.path)} | {k: run.summary.get(k) for k in keys}


def evaluate(
    images_dir: str | os.PathLike,
    subject_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    token: str | None = None,
    base_images_dir: str | os.PathLike | None = None,
    backbones: Backbones | None = None,
    report: bool = True,
    progress: bool = True,
) -> dict:
    """Score a folder of generated images against the subject photos; write the results.

    Writes ``out_dir/metrics.json`` and (``report=True``) ``out_dir/report.html`` with its
    thumbnails and plot, and returns the metrics dict (see metrics.json).

    Args:
        images_dir: a ``sdatom sample`` folder (manifest.json, or PNGs with a prompt chunk).
        subject_dir: the subject photos (the training images).
        out_dir: where to write, normally ``runs/<name>/eval``.
        token: placeholder token removed from prompts for CLIP-T; None: the run's
            ``train_summary.json`` token when ``out_dir`` is inside a run, else ``"sks"``.
        base_images_dir: the base model's images for the same prompts and seeds (optional);
            enables the preservation metrics.
        backbones: from :func:`load_backbones`; None loads the defaults.
        report: also write report.html.
        progress: show a progress bar on a terminal.

    Raises:
        UsageError: a folder is missing or unusable, or backbone weights are unavailable.
    """
    started = time.perf_counter()
    images_dir, subject_dir, out_dir = Path(images_dir), Path(subject_dir), Path(out_dir)
    generated = read_generated(images_dir, option="--images")
    subject_paths = find_images(subject_dir)
    base = read_generated(base_images_dir, option="--base-images") if base_images_dir else None
    run = _read_run_info(out_dir, images_dir)
    token = token or run.get("token") or "sks"
    if backbones is None:
        backbones = load_backbones()

    groups = _group_by_prompt(generated)
    # Embeddings (3 steps), then one step per prompt (its diversity: pairwise LPIPS).
    bar = progress_bar(3 + len(groups), "eval", enabled=progress)
    gen_pil = [load_image(g.path) for g in generated]
    subj_pil = [load_image(p) for p in subject_paths]
    gen_clip, subj_clip = (
        clip_image_embeddings(backbones, gen_pil),
        clip_image_embeddings(backbones, subj_pil),
    )
    bar.update(1)
    gen_dino, subj_dino = dino_embeddings(backbones, gen_pil), dino_embeddings(backbones, subj_pil)
    bar.update(1)
    texts = {p: strip_token(p, token) for p in groups}
    text_emb = dict(zip(texts, clip_text_embeddings(backbones, list(texts.values())), strict=True))
    bar.update(1)

    per_image = []
    for i, g in enumerate(generated):
        per_image.append(
            {
                "file": os.path.relpath(g.path, images_dir),
                "prompt": g.prompt,
                "seed": g.seed,
                "clip_t": float(gen_clip[i] @ text_emb[g.prompt]),
                "clip_i": mean_pairwise_cosine(gen_clip[i : i + 1], subj_clip),
                "dino": mean_pairwise_cosine(gen_dino[i : i + 1], subj_dino),
            }
        )

    notes: dict[str, str] = {}
    if base is not None:
        _add_preservation(backbones, generated, gen_pil, base, per_image, token, notes)
    if backbones.lpips is None:
        notes["lpips_diversity"] = backbones.lpips_note or "LPIPS is not available"

    prompts = []
    for prompt, idx in groups.items():
        entry: dict = {"prompt": prompt, "text": texts[prompt], "n_images": len(idx)}
        entry["files"] = [per_image[i]["file"] for i in idx]
        for key in ("clip_t", "clip_i", "dino", "preserve_clip_i", "preserve_dino"):
            entry[key] = _mean([per_image[i].get(key) for i in idx])
        several = len(idx) >= 2
        entry["lpips_diversity"] = (
            lpips_diversity(backbones, [gen_pil[i] for i in idx])
            if several and backbones.lpips is not None
            else None
        )
        entry["vendi_clip"] = vendi_score(gen_clip[idx]) if several else None
        entry["vendi_dino"] = vendi_score(gen_dino[idx]) if several else None
        prompts.append(entry)
        bar.update(1)
    bar.close()
    if all(len(idx) < 2 for idx in groups.values()):
        notes.setdefault("lpips_diversity", "every prompt has a single image: no pairs")
        notes["vendi"] = "every prompt has a single image: no diversity to measure"

    overall = {
        # Similarities average over images (DreamBench), diversities over prompts.
        "clip_t": _mean([r["clip_t"] for r in per_image]),
        "clip_i": _mean([r["clip_i"] for r in per_image]),
        "dino": _mean([r["dino"] for r in per_image]),
        "lpips_diversity": _mean([p["lpips_diversity"] for p in prompts]),
        "vendi_clip": _mean([p["vendi_clip"] for p in prompts]),
        "vendi_dino": _mean([p["vendi_dino"] for p in prompts]),
        "preserve_clip_i": _mean([r.get("preserve_clip_i") for r in per_image]),
        "preserve_dino": _mean([r.get("preserve_dino") for r in per_image]),
    }
    if run.get("model") == "toy":
        overall |= _toy_oracle(subj_pil, generated, gen_pil, per_image, token)
    metrics = {
        "format": FORMAT,
        "sdatom_version": sdatom.__version__,
        "random_backbones": backbones.random,
        "warning": RANDOM_WARNING if backbones.random else None,
        "backbones": dict(backbones.names) | {"device": backbones.device},
        "scales": {key: text for key, _, text in METRICS},
        "run": run or None,
        "settings": read_manifest_settings(images_dir),
        "inputs": {
            "images_dir": str(images_dir),
            "subject_dir": str(subject_dir),
            "subject_images": [str(p) for p in subject_paths],
            "base_images_dir": str(base_images_dir) if base_images_dir else None,
            "token": token,
            "n_images": len(generated),
            "n_subject_images": len(subject_paths),
            "n_prompts": len(groups),
            "n_base_pairs": sum("preserve_clip_i" in r for r in per_image) if base else None,
        },
        "overall": overall,
        "notes": notes,
        "prompts": prompts,
        "images": per_image,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if report:
        from sdatom.eval.report import write_report

        write_report(metrics, out_dir)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _toy_oracle(subj_pil, generated, gen_pil, per_image, token: str) -> dict:
    """Toy-world runs: the oracle's exact fidelity, alignment, drift and diversity."""
    from sdatom.toyworld.quality import oracle_metrics
    from sdatom.toyworld.subjects import read_subject

    subject = read_subject(subj_pil)
    if subject is None:
        return {}
    overall, rows = oracle_metrics(subject, [g.prompt for g in generated], gen_pil, token)
    for record, row in zip(per_image, rows, strict=True):
        record["oracle"] = {k: v for k, v in row.items() if k != "prompt"}
    return {k: v for k, v in overall.items() if v is not None}  # only the roles sampled


def _add_preservation(
    backbones: Backbones,
    generated: list[GeneratedImage],
    gen_pil: list[Image.Image],
    base: list[GeneratedImage],
    per_image: list[dict],
    token: str,
    notes: dict[str, str],
) -> None:
    """Pair adapted and base images by (prompt without token, seed); add preserve_* scores."""
    by_key = {(strip_token(b.prompt, token), b.seed): b for b in base if b.seed is not None}
    pairs = [
        (i, by_key[(strip_token(g.prompt, token), g.seed)])
        for i, g in enumerate(generated)
        if g.seed is not None and (strip_token(g.prompt, token), g.seed) in by_key
    ]
    if not pairs:
        raise UsageError(
            "no image in --base-images shares a prompt and seed with --images: generate the "
            "base images with the same prompts and seeds"
        )
    if len(pairs) < len(generated):
        notes["preservation"] = (
            f"{len(generated) - len(pairs)} of {len(generated)} images have no base image "
            "with the same prompt and seed; preservation uses the other ones"
        )
    scores = same_seed_similarity(
        backbones, [gen_pil[i] for i, _ in pairs], [load_image(b.path) for _, b in pairs]
    )
    for (i, b), c, d in zip(pairs, scores["clip_i"], scores["dino"], strict=True):
        per_image[i]["base_file"] = str(b.path)
        per_image[i]["preserve_clip_i"] = c
        per_image[i]["preserve_dino"] = d


# --------------------------------------------------------------------------- table


def format_table(metrics: dict, *, per_prompt: bool = False) -> str:
    """A short plain-text table of the overall metrics (and optionally per prompt)."""
    lines = []
    if metrics.get("random_backbones"):
        lines += [f"!!! {RANDOM_WARNING} !!!", ""]
    overall = metrics.get("overall", {})
    with_base = bool(metrics.get("inputs", {}).get("base_images_dir"))
    rows = [
        (label, fmt(overall.get(key)))
        for key, label, _ in METRICS
        if key in overall and (with_base or not key.startswith("preserve"))
    ]
    width = max(len(label) for label, _ in rows)
    lines.append(f"{'metric':<{width}}  value")
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    inputs = metrics.get("inputs", {})
    lines.append(
        f"({inputs.get('n_images', '?')} images, {inputs.get('n_prompts', '?')} prompts, "
        f"{inputs.get('n_subject_images', '?')} subject photos; CLIP-T is a raw cosine, not x100)"
    )
    for key, note in metrics.get("notes", {}).items():
        lines.append(f"note ({key}): {note}")
    if per_prompt:
        lines.append("")
        lines.append(f"{'CLIP-T':>7} {'CLIP-I':>7} {'DINO':>7}  prompt")
        for p in metrics.get("prompts", []):
            prompt = p["prompt"] if len(p["prompt"]) <= 60 else p["prompt"][:57] + "..."
            cells = " ".join(f"{fmt(p[k], 3):>7}" for k in ("clip_t", "clip_i", "dino"))
            lines.append(f"{cells}  {prompt}")
    return "\n".join(lines)
