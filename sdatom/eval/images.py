"""Read a folder of generated images (``sdatom sample`` output) with their prompts and seeds."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdatom.data import find_images
from sdatom.errors import DataError, UsageError
from sdatom.sample import GRID, MANIFEST

__all__ = ["GeneratedImage", "read_generated", "read_manifest_settings"]


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image: its file, the prompt it was made from and its seed (if known)."""

    path: Path
    prompt: str
    seed: int | None = None
    prompt_index: int | None = None


def _int_or_none(value: object) -> int | None:
    try:
        return None if value is None else int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _read_manifest(folder: Path, option: str) -> tuple[list[GeneratedImage], dict]:
    manifest = folder / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{manifest} is not valid JSON ({err}): re-run `sdatom sample`") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f'{manifest} lists no images (expected {{"images": [...]}})')
    images = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "file" not in entry or "prompt" not in entry:
            raise DataError(f"{manifest}: images[{i}] needs 'file' and 'prompt'")
        path = folder / str(entry["file"])
        if not path.is_file():
            raise DataError(
                f"{manifest} lists {entry['file']} but {path} does not exist: "
                f"re-run `sdatom sample` or fix {option}"
            )
        images.append(
            GeneratedImage(
                path=path,
                prompt=str(entry["prompt"]),
                seed=_int_or_none(entry.get("seed")),
                prompt_index=_int_or_none(entry.get("prompt_index")),
            )
        )
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    return images, settings


def _read_png_chunks(folder: Path, option: str) -> list[GeneratedImage]:
    try:
        with warnings.catch_warnings():
            # find_images words its warnings for subject folders ("a single image; use 3-5").
            warnings.simplefilter("ignore", UserWarning)
            paths = find_images(folder)
    except DataError:
        raise UsageError(
            f"{option} {folder} holds no images: pass a folder written by `sdatom sample`"
        ) from None
    images, without = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                text = dict(getattr(img, "text", {}) or {})
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path} is not a readable image ({err})") from None
        prompt = text.get("prompt")
        if not prompt:
            without.append(path)
            continue
        images.append(GeneratedImage(path=path, prompt=prompt, seed=_int_or_none(text.get("seed"))))
    if not images:
        raise UsageError(
            f"{option} {folder} has no {MANIFEST} and its images carry no 'prompt' PNG text "
            "chunk: pass a folder written by `sdatom sample`"
        )
    others = [p.name for p in without if p.name != GRID]  # sample's grid.png has no prompt
    if others:
        warnings.warn(
            f"{option} {folder}: skipping image(s) without a 'prompt' PNG text chunk: "
            + ", ".join(others),
            stacklevel=3,
        )
    return images


def read_generated(folder: str | os.PathLike, *, option: str = "--images") -> list[GeneratedImage]:
    """The images of a ``sdatom sample`` folder, in manifest order.

    Prompts and seeds come from ``manifest.json``; without one, from each PNG's ``prompt`` (and
    ``seed``) text chunk, skipping images without one (``grid.png`` silently, others with a
    warning). ``option`` names the CLI option in error messages.

    Raises:
        UsageError: the folder is missing or holds no images with known prompts.
        DataError: the manifest is broken or lists files that are missing.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(
            f"{option} {root} is not a folder: pass a folder written by `sdatom sample`"
        )
    if (root / MANIFEST).is_file():
        return _read_manifest(root, option)[0]
    return _read_png_chunks(root, option)


def read_manifest_settings(folder: str | os.PathLike) -> dict:
    """The ``settings`` block of a sample folder's manifest (empty without a valid manifest)."""
    manifest = Path(folder) / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    settings = data.get("settings") if isinstance(data, dict) else None
    return settings if isinstance(settings, dict) else {}
