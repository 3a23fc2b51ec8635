"""Model cards (``README.md`` via huggingface_hub's ``ModelCard``) for export folders, and
``--push-to-hub``.

Every export writes a card beside what it wrote: base model, method, trigger prompt, the run's
newest sample grid, its metrics if it was evaluated, and how to load the file in diffusers,
ComfyUI and AUTOMATIC1111/Forge. A ``README.md`` that sdatom did not write is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sdatom.errors import SdatomError, first_line
from sdatom.fileio import atomic_path, atomic_write_text
from sdatom.runs import Run

__all__ = ["CARD_FILE", "GRID_FILE", "HubError", "push_to_hub", "write_model_card"]

CARD_FILE = "README.md"
GRID_FILE = "samples.png"
_MARK = "<!-- written by sdatom export: rewritten on the next export into this folder -->"


class HubError(SdatomError):
    """``--push-to-hub`` failed (offline, not logged in, no access); the files stay on disk."""


def _newest_grid(run: Run) -> Path | None:
    grids = sorted((run.path / "samples").glob("*/grid.png"), key=lambda p: p.stat().st_mtime)
    return grids[-1] if grids else None


def _metrics(run: Run) -> dict[str, float]:
    try:
        data = json.loads((run.path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    found = data.get("metrics", data) if isinstance(data, dict) else {}
    if not isinstance(found, dict):
        return {}
    return {
        k: v for k, v in found.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _is_hub_id(spec: str | None) -> bool:
    if not spec or ":" in spec or spec in ("tiny", "tiny-sdxl", "toy"):
        return False
    return spec.count("/") == 1 and not os.path.exists(spec)


_HOW = {
    "lora": """\
- **diffusers**{dense_note}:
  ```python
  pipe.load_lora_weights("{folder}", weight_name="{file}")
  pipe.fuse_lora(lora_scale=1.0)  # optional: fold it in
  ```
- **ComfyUI**: copy `{file}` to `ComfyUI/models/loras/` and use a *LoraLoaderModelOnly* node.
- **AUTOMATIC1111 / Forge**: copy `{file}` to `models/Lora/` and add `<lora:{stem}:1>` to the
  prompt.
""",
    "diff": """\
- **ComfyUI**: copy `{file}` to `ComfyUI/models/loras/` and use a *LoraLoaderModelOnly* node
  (LyCORIS full-diff keys, exact).
- **AUTOMATIC1111 / Forge**: copy `{file}` to `models/Lora/` and add `<lora:{stem}:1>` to the
  prompt.
- **diffusers** does not read LyCORIS full diffs: export with `--lora` for diffusers.
""",
    "diffusers": """\
- **diffusers**: `StableDiffusionPipeline.from_pretrained("{folder}")` (SDXL:
  `StableDiffusionXLPipeline`); the adapter is folded into the weights.
""",
    "ldm-single-file": """\
- **ComfyUI**: copy `{file}` to `ComfyUI/models/checkpoints/`.
- **AUTOMATIC1111 / Forge**: copy `{file}` to `models/Stable-diffusion/`.
- **diffusers**: `StableDiffusionPipeline.from_single_file("{file}")` (SDXL:
  `StableDiffusionXLPipeline`).
""",
}


def write_model_card(
    run: Run,
    exported: Path,
    kind: str,
    *,
    report_lines: list[str] | None = None,
    dense_layers: int = 0,
) -> Path | None:
    """Write ``README.md`` into the export folder (``exported`` itself when it is a folder,
    else its parent) and copy the run's newest sample grid beside it as ``samples.png``.

    Returns the card's path, or None when a ``README.md`` not written by sdatom is there.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = exported if exported.is_dir() else exported.parent
    card_path = folder / CARD_FILE
    if card_path.exists() and _MARK not in card_path.read_text(encoding="utf-8", errors="replace"):
        return None
    token, cls = run.config.get("token"), run.config.get("class_name")
    trigger = f"{token} {cls}" if token and cls else None
    data = ModelCardData(
        base_model=run.model if _is_hub_id(run.model) else None,
        library_name="diffusers",
        tags=["sdatom", "filter-atoms", "text-to-image", "stable-diffusion", kind],
        pipeline_tag="text-to-image",
        instance_prompt=f"a photo of {trigger}" if trigger else None,
    )
    grid = _newest_grid(run)
    if grid is not None:
        with atomic_path(folder / GRID_FILE) as tmp:
            shutil.copyfile(grid, tmp)
    metrics = _metrics(run)
    from types import SimpleNamespace

    from sdatom.methods import get_method

    preset = get_method(run.method).preset(SimpleNamespace(preset=run.config.get("preset")))
    body = [
        f"# {exported.stem if exported.is_file() else exported.name}",
        "",
        _MARK,
        "",
        f"Trained with [sdatom](https://arxiv.org/abs/2403.00269) (filter atoms): method "
        f"**{run.method}**" + (f", preset **{preset}**" if preset else "") + f", run `{run.name}`.",
        "",
        f"- Base model: `{run.model}`",
        f"- Trigger prompt: `a photo of {trigger}`" if trigger else "- Trigger prompt: none",
        f"- File: `{exported.name}` ({kind})",
        "",
    ]
    if report_lines:
        body += ["## Export", "", *[f"- {line}" for line in report_lines], ""]
    if grid is not None:
        body += ["## Samples", "", f"![samples]({GRID_FILE})", f"(from `{grid}`)", ""]
    if metrics:
        body += ["## Metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
        body.append("")
    dense_note = (
        f" (this file stores {dense_layers} layers as full diffs, which diffusers refuses: "
        "re-export with `--dense lora`)"
        if dense_layers
        else ""
    )
    how = _HOW.get(kind, "").format(
        folder=folder, file=exported.name, stem=exported.stem, dense_note=dense_note
    )
    body += ["## How to use", "", how]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    atomic_write_text(card_path, str(card))
    return card_path


def push_to_hub(repo: str, paths: list[Path]) -> str:
    """Upload ``paths`` (files, or a folder's contents) to the model repo ``repo``; returns its
    URL. Any hub failure is one :class:`HubError` line that says the files stay on disk."""
    try:  # huggingface_hub's HTTP client: httpx2 from 2.0, httpx before
        import httpx2 as http
    except ImportError:
        import httpx as http
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    where = ", ".join(str(p) for p in paths)
    later = f"upload them later with `hf upload {repo} <file>`; they are written: {where}"
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"--push-to-hub {repo}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1); {later}"
        )
    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True)
        for path in paths:
            if path.is_dir():
                api.upload_folder(repo_id=repo, folder_path=str(path))
            else:
                api.upload_file(repo_id=repo, path_or_fileobj=str(path), path_in_repo=path.name)
    except (OfflineModeIsEnabled, LocalTokenNotFoundError, HfHubHTTPError, OSError) as e:
        raise HubError(f"--push-to-hub {repo}: {first_line(e, 200)}; {later}") from None
    except http.HTTPError as e:  # no connection, DNS, timeouts
        raise HubError(
            f"--push-to-hub {repo}: cannot reach the Hub ({first_line(e, 200)}); {later}"
        ) from None
    return str(url)
