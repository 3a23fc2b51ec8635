"""Generation: n images per prompt with one fixed seed per image, PNGs, a manifest and a grid.

Image ``j`` of every prompt uses seed ``seed + j`` through its own ``torch.Generator``, so one
(prompt, seed) pair gives the same image whatever ``n``, the batch size or the prompt order,
and a base model and an adapted one can be compared image by image.

Output folder::

    p000-i00.png ...   one PNG per image, with text chunks (prompt, seed, steps, model, ...)
    manifest.json      {"images": [{"file", "prompt", "seed", "prompt_index"}], "settings": {...}}
    grid.png           one row per prompt (or a near-square grid for a single prompt)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdatom.errors import DataError, UsageError
from sdatom.fileio import atomic_path, atomic_write_text
from sdatom.token_embedding import expand

__all__ = [
    "SCHEDULERS",
    "GeneratedSample",
    "SampleOptions",
    "SampleResult",
    "default_guidance",
    "generate",
    "make_grid",
    "read_prompts_file",
    "resolve_prompts",
    "run_sampling",
    "sample",
]

#: ``--scheduler`` names and their diffusers classes (built from the model's scheduler config).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
MANIFEST = "manifest.json"  # a sample folder's index of prompts and seeds (read by eval)
GRID = "grid.png"
#: Grid cells are shrunk to at most this many pixels on a side (the PNGs keep full size).
GRID_CELL = 256
PROTOCOL_IMAGES = 4


@dataclass(frozen=True)
class GeneratedSample:
    """One generated image: float RGB array (H, W, 3) in [0, 1] with its prompt and seed."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    image: np.ndarray


@dataclass(frozen=True)
class SampleOptions:
    """How the images of every prompt are generated; checked on creation.

    Image ``j`` of a prompt uses seed ``seed + j``. ``scheduler`` is ``ddim``, ``dpm++``,
    ``euler`` or None (the model's own). ``height``/``width`` None mean the model's size.
    ``guidance`` None means the model's own (:func:`default_guidance`).
    ``batch_size`` > 1 is faster on a GPU, but batched kernels round differently: images then
    match the unbatched ones only up to float rounding (at most one 8-bit level in a PNG).
    """

    n: int = 4
    seed: int = 0
    steps: int = 30
    guidance: float | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        _check_counts(n=self.n, steps=self.steps, batch_size=self.batch_size)
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise UsageError(
                f"--scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}"
            )


@dataclass(frozen=True)
class SampleResult:
    """What :func:`run_sampling` wrote: the folder, its grid and the image files."""

    output_dir: Path
    grid: Path
    images: list[Path]
    device: str = "cpu"
    dtype: str = "fp32"  # what ``--dtype auto`` chose, or the dtype asked for


# ----------------------------------------------------------------------------- generation


def _scheduler(pipe: Any, name: str | None):
    import diffusers

    if name is None:
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    if name not in SCHEDULERS:
        raise UsageError(f"--scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def default_guidance(pipe: Any) -> float:
    """The classifier-free guidance used when none is asked for: the toy model's own, chosen by
    measurement (:data:`sdatom.toyworld.model.SAMPLE_GUIDANCE`), else the pipeline's own
    default as diffusers sets it (7.5 for SD-1.x/2.x, 5.0 for SDXL)."""
    import inspect

    from sdatom.toyworld.model import SAMPLE_GUIDANCE, TOY_MODEL_DIR

    name = _model_name(pipe)
    if name and Path(name).resolve() == TOY_MODEL_DIR.resolve():
        return SAMPLE_GUIDANCE
    return float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)


def generate(
    pipe: Any, prompts: Sequence[str], options: SampleOptions | None = None, **option_values: Any
) -> Iterator[GeneratedSample]:
    """Yield ``n`` images per prompt (prompt-major), image ``j`` seeded with ``seed + j``.

    ``options`` (or its fields as keywords: ``n=2, steps=20``) says how; see SampleOptions.
    The pipeline's scheduler is replaced for the call and restored afterwards. Images come as
    float arrays in [0, 1].
    """
    o = options or SampleOptions(**option_values)
    jobs = [(i, j, p) for i, p in enumerate(prompts) for j in range(o.n)]
    guidance = default_guidance(pipe) if o.guidance is None else o.guidance
    original = pipe.scheduler
    pipe.scheduler = _scheduler(pipe, o.scheduler)
    try:
        for start in range(0, len(jobs), o.batch_size):
            batch = jobs[start : start + o.batch_size]
            # One CPU generator per image: the initial noise depends on its seed only.
            generators = [torch.Generator("cpu").manual_seed(o.seed + j) for _, j, _ in batch]
            negative = None if o.negative_prompt is None else [o.negative_prompt] * len(batch)
            with torch.inference_mode():
                out = pipe(
                    prompt=[p for _, _, p in batch],
                    negative_prompt=negative,
                    num_inference_steps=o.steps,
                    guidance_scale=guidance,
                    height=o.height,
                    width=o.width,
                    generator=generators,
                    output_type="np",
                )
            for (i, j, p), image in zip(batch, out.images, strict=True):
                yield GeneratedSample(i, j, p, o.seed + j, np.asarray(image, dtype=np.float32))
    finally:
        pipe.scheduler = original


def _check_counts(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            option = "-n" if name == "n" else f"--{name.replace('_', '-')}"
            raise UsageError(f"{option} must be a whole number >= 1, got {value!r}")


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))


def _model_name(pipe: Any) -> str:
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")


def sample(
    pipe: Any,
    prompts: Sequence[str],
    *,
    output_dir: str | os.PathLike,
    options: SampleOptions | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    **option_values: Any,
) -> list[Path]:
    """Generate ``n`` images per prompt into ``output_dir``; return the image paths.

    ``options`` (or its fields as keywords) as for :func:`generate`. Writes
    ``p{prompt:03d}-i{image:02d}.png`` (with PNG text chunks), ``manifest.json`` (atomically)
    and ``grid.png``. ``settings`` overrides manifest settings such as ``model`` and
    ``adapter`` (default: the pipeline's name and no adapter).
    """
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts: pass --prompt, --prompts-file or --protocol")
    o = options or SampleOptions(**option_values)
    if o.guidance is None:  # resolved once: generate and the manifest use the same value
        o = replace(o, guidance=default_guidance(pipe))
    from sdatom.progress import progress_bar

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; pass a folder")
    info = {
        "model": _model_name(pipe),
        "steps": o.steps,
        "guidance": o.guidance,
        "scheduler": o.scheduler or type(pipe.scheduler).__name__,
        "adapter": None,
        "negative_prompt": o.negative_prompt,
        "height": o.height,
        "width": o.width,
        **(settings or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    paths: list[Path] = []
    cells: list[Image.Image] = []
    bar = progress_bar(len(prompts) * o.n, "sample", enabled=progress, unit="img")
    for s in generate(pipe, prompts, o):
        image = _to_pil(s.image)
        name = f"p{s.prompt_index:03d}-i{s.image_index:02d}.png"
        text = {**info, "prompt": s.prompt, "seed": s.seed}
        png = PngInfo()
        for key in ("prompt", "seed", "negative_prompt", "steps", "guidance", "scheduler",
                    "model", "adapter"):  # fmt: skip
            png.add_text(key, "" if text[key] is None else str(text[key]))
        with atomic_path(out / name) as tmp:
            image.save(tmp, format="PNG", pnginfo=png)
        entries.append({"file": name, "prompt": s.prompt, "seed": s.seed,
                        "prompt_index": s.prompt_index})  # fmt: skip
        paths.append(out / name)
        image.thumbnail((GRID_CELL, GRID_CELL))
        cells.append(image)
        bar.update(1)
    bar.close()
    if info["height"] is None or info["width"] is None:
        with Image.open(paths[0]) as first:
            info["width"], info["height"] = first.size
    rows = len(prompts) if len(prompts) > 1 else None
    with atomic_path(out / GRID) as tmp:
        make_grid(cells, rows=rows).save(tmp, format="PNG")
    manifest = {"images": entries, "settings": info}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return paths


def make_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """Tile same-sized images row by row: ``rows`` rows, or a near-square grid when None.

    diffusers' ``make_image_grid`` needs ``rows × cols == len(images)``; a sample grid is often
    ragged (7 prompts × 1 image), so the last row may be short here.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    count = len(images)
    if rows is None:
        cols = math.ceil(math.sqrt(count))
        rows = math.ceil(count / cols)
    else:
        cols = math.ceil(count / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % cols) * w, (k // cols) * h))
    return grid


# ----------------------------------------------------------------------------- prompts


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts-file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--prompts-file {path} is not a UTF-8 text file ({e})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DataError(f"--prompts-file {path} holds no prompts (one per line, # for comments)")
    return prompts


def _toy_protocol(run: Any) -> list[str]:
    """A toy run's protocol: the subject on the backgrounds it was not shown on, at each
    position, and its class without the token (drift). The subject is read by the oracle."""
    from sdatom.data import find_images
    from sdatom.toyworld.subjects import protocol, read_subject

    subject = (
        read_subject(find_images(run.config["subject"])) if run.config.get("subject") else None
    )
    if subject is None:
        raise UsageError(
            f"{run.path}: the toy protocol reads the subject from its photos, and "
            f"{run.config.get('subject')} holds no toy-world picture: pass --prompt instead"
        )
    return [text for text, _ in protocol(subject, token=str(run.config.get("token", "sks")))]


def resolve_prompts(
    prompts: Sequence[str] = (),
    prompts_file: str | os.PathLike | None = None,
    protocol: bool | str | os.PathLike | None = None,
    run: Any = None,
) -> list[str]:
    """The prompt list from ``--prompt`` values plus ``--prompts-file``, or from ``--protocol``.

    ``protocol=True`` is sdatom's own prompt set for the run's subject (``token class_name``);
    a path is DreamBench's ``prompts_and_classes.txt`` (its object or live list, by class).
    """
    from sdatom.prompts import is_live_class, protocol_prompts

    given = [p.strip() for p in prompts if p and p.strip()]
    if protocol not in (None, False):
        if given or prompts_file is not None:
            raise UsageError("--protocol replaces --prompt/--prompts-file: pass one or the other")
        if run is None:
            raise UsageError("--protocol needs --run (its token and class name make the prompts)")
        source = None if protocol is True else Path(protocol)
        if source is None and run.model == "toy":
            return _toy_protocol(run)
        return protocol_prompts(
            run.subject_text, live=is_live_class(str(run.config["class_name"])), source=source
        )
    if prompts_file is not None:
        given += read_prompts_file(prompts_file)
    if not given:
        raise UsageError(
            "no prompts: pass --prompt TEXT (repeatable), --prompts-file or --protocol"
        )
    return given


# ----------------------------------------------------------------------------- from options


def _default_output(run: Any, base: bool = False) -> Path:
    root = run.path / "samples" if run is not None else Path("samples")
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-base" if base else "")
    out, k = root / stamp, 1
    while out.exists():
        k += 1
        out = root / f"{stamp}-{k}"
    return out


def run_sampling(
    *,
    run: str | os.PathLike | None = None,
    model: str | None = None,
    prompts: Sequence[str] = (),
    prompts_file: str | os.PathLike | None = None,
    protocol: bool | str | os.PathLike | None = None,
    options: SampleOptions | None = None,
    output: str | os.PathLike | None = None,
    merge: bool = True,
    base: bool = False,
    device: str | None = "auto",
    dtype: str = "auto",
    model_config: str | None = None,
    vae: str | None = None,
    force: bool = False,
    progress: bool = True,
    **option_values: Any,
) -> SampleResult:
    """``sdatom sample``: load a run's adapted model (or a plain ``model``) and sample it.

    With ``run``, ``model`` overrides its base model and ``base=True`` samples the base model
    without the adapter (same prompts and seeds, for comparisons). Without ``run``, ``model``
    (or the default model) is sampled as is. The output folder defaults to
    ``<run>/samples/<timestamp>`` or ``samples/<timestamp>``. ``options`` (or its fields as
    keywords) as for :func:`generate`, checked before any model is loaded.
    """
    from sdatom.models import auto_dtype, default_model, load_pipeline, resolve_device
    from sdatom.runs import load_run_pipeline, read_run

    if run is None and base:
        raise UsageError("--base needs --run (it samples the run's base model)")
    o = options or SampleOptions(**option_values)
    the_run = read_run(run) if run is not None else None
    prompt_list = resolve_prompts(prompts, prompts_file, protocol, the_run)
    torch_device = resolve_device(device)
    device = str(torch_device)
    dtype = auto_dtype(torch_device) if dtype == "auto" else dtype
    if the_run is None or base:
        spec = model or (the_run.model if the_run is not None else None) or default_model()
        vae = vae or (the_run.config.get("vae") if the_run is not None and not model else None)
        pipe = load_pipeline(spec, dtype=dtype, device=device, config=model_config, vae=vae)
        adapter = None
    else:
        spec = model or the_run.model or ""
        pipe = load_run_pipeline(
            the_run,
            merge=merge,
            dtype=dtype,
            device=device,
            model=model,
            model_config=model_config,
            vae=vae,
            force=force,
        )
        adapter = str(the_run.adapter)
    out = Path(output) if output is not None else _default_output(the_run, base)
    settings = {
        "model": spec,
        "adapter": adapter,
        "method": the_run.method if adapter else None,
        "device": device,
        "dtype": dtype,
    }
    images = sample(
        pipe, prompt_list, output_dir=out, options=o, settings=settings, progress=progress
    )
    return SampleResult(output_dir=out, grid=out / GRID, images=images, device=device, dtype=dtype)


@torch.no_grad()
def validation_samples(
    pipe: Any, unet: torch.nn.Module, config: Any, folder: Path, accelerator: Any
) -> None:
    """Sample a training run's validation prompts with fixed seeds into ``folder``, with the
    UNet being trained (``config`` is the run's resolved TrainConfig).

    The images are shared out across processes (image i on process i % N), so every
    process works and none waits long on another.
    """
    c = config
    folder.mkdir(parents=True, exist_ok=True)
    was_training = unet.training
    unet.eval()
    jobs = [(p, i) for p, _ in enumerate(c.validation_prompts) for i in range(c.validation_images)]
    guidance = default_guidance(pipe)
    original_unet = pipe.unet
    pipe.unet = unet
    try:
        for k in range(accelerator.process_index, len(jobs), accelerator.num_processes):
            p, i = jobs[k]
            prompt = c.validation_prompts[p]
            if c.train_token:  # the attached vectors take the token once per vector
                prompt = expand(prompt, c.token, c.token_vectors)
            with accelerator.autocast():
                image = pipe(
                    prompt,
                    num_inference_steps=c.validation_steps,
                    guidance_scale=guidance,
                    height=c.resolution,
                    width=c.resolution,
                    generator=torch.Generator(device="cpu").manual_seed(c.seed + i),
                ).images[0]
            with atomic_path(folder / f"p{p:03d}-i{i:02d}.png") as tmp:
                image.save(tmp, format="PNG")
    finally:
        pipe.unet = original_unet
        unet.train(was_training)
    accelerator.wait_for_everyone()
