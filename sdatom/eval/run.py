"""``sdatom eval --run``: find a run's images and subject, then score them."""

from __future__ import annotations

import os
from pathlib import Path

from sdatom.errors import UsageError
from sdatom.sample import MANIFEST


def _sample_folders(run_dir: Path) -> list[Path]:
    root = run_dir / "samples"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if (p / MANIFEST).is_file() and not p.name.startswith("step-")
    ]
    return sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime)


def default_images(run_dir: Path) -> tuple[Path, Path | None]:
    """The newest adapted sample folder of a run, and its base-model twin when there is one."""
    folders = _sample_folders(run_dir)
    adapted = [p for p in folders if not p.name.endswith("-base")]
    if not adapted:
        raise UsageError(
            f"{run_dir} has no sampled images yet: run `sdatom sample --run {run_dir} --protocol` "
            "first, or pass --images DIR"
        )
    images = adapted[-1]
    base = [p for p in folders if p.name.endswith("-base")]
    twin = images.with_name(images.name + "-base")
    return images, twin if twin.is_dir() else (base[-1] if base else None)


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    subject: str | os.PathLike | None = None,
    base_images: str | os.PathLike | None = None,
    clip_model: str = "ViT-B-32",
    clip_weights: str | None = None,
    dino_weights: str | None = None,
    random_backbones: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Score a run's samples against its subject photos into ``<run>/eval/``."""
    from sdatom.eval.backbones import load_backbones
    from sdatom.eval.metrics import evaluate
    from sdatom.runs import read_run

    run = read_run(run_dir)
    if images is None:
        images, found_base = default_images(run.path)
        base_images = base_images or found_base
    subject = subject or run.config.get("subject")
    if not subject:
        raise UsageError(f"{run.path}/config.yaml names no subject folder: pass --subject DIR")
    own_backbones = clip_weights or dino_weights or random_backbones
    if run.model == "toy" and not own_backbones:
        from sdatom.toyworld.backbones import toy_backbones

        backbones = toy_backbones(device)  # the toy CLIP and attribute net know the world
    else:
        backbones = load_backbones(
            clip_model=clip_model,
            clip_weights=clip_weights,
            dino_weights=dino_weights,
            random=random_backbones,
            device=device,
        )
    return evaluate(
        images,
        subject,
        run.path / "eval",
        token=run.config.get("token"),
        base_images_dir=base_images,
        backbones=backbones,
        progress=progress,
    )
