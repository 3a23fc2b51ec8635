"""report.html: one self-contained page per evaluation (thumbnails and plot beside it)."""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

from sdatom.data import load_image
from sdatom.errors import DataError
from sdatom.eval.common import METRICS, PAGE_CSS, fmt, metric_label, random_banner
from sdatom.fileio import atomic_path, atomic_write_text

__all__ = ["write_report"]

THUMB_DIR = "thumbs"
THUMB_SIZE = 256
PLOT_FILE = "metrics.png"


def _thumbnail(src: Path, dst: Path) -> None:
    """A JPEG thumbnail (longer side THUMB_SIZE) of ``src`` written atomically at ``dst``."""
    img = load_image(src)
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    with atomic_path(dst) as tmp:
        img.save(tmp, format="JPEG", quality=88)


def _plot(metrics: dict, out: Path) -> None:
    """Overall metrics as bars, and per-prompt CLIP-T vs CLIP-I as a scatter."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    overall = metrics["overall"]
    keys = [k for k, _, _ in METRICS if overall.get(k) is not None and not k.startswith("vendi")]
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    values = [overall[k] for k in keys]
    bars = ax1.bar([metric_label(k) for k in keys], values, color="#4c72b0")
    ax1.bar_label(bars, labels=[fmt(v, 3) for v in values], fontsize=8)
    ax1.set_title("overall (cosines / LPIPS distance)")
    ax1.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax1.axhline(0, color="#888", linewidth=0.8)

    prompts = [p for p in metrics["prompts"] if p["clip_t"] is not None and p["clip_i"] is not None]
    ax2.scatter([p["clip_i"] for p in prompts], [p["clip_t"] for p in prompts], color="#dd8452")
    for n, p in enumerate(prompts):
        ax2.annotate(
            str(n),
            (p["clip_i"], p["clip_t"]),
            fontsize=8,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax2.set_xlabel("CLIP-I (subject fidelity)")
    ax2.set_ylabel("CLIP-T (prompt fidelity)")
    ax2.set_title("per prompt (numbers = prompt #)")
    if metrics.get("random_backbones"):
        fig.suptitle("RANDOM BACKBONES — meaningless numbers", color="#c00", fontweight="bold")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")


def _rel(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.resolve().as_uri()


def _figure(thumb: str, link: str, caption: str) -> str:
    if not thumb:
        return f"<figure><figcaption>unreadable image: {html.escape(link)}</figcaption></figure>"
    return (
        f'<figure><a href="{html.escape(link)}"><img src="{html.escape(thumb)}" alt="'
        f'{html.escape(caption)}" loading="eager"></a><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
    )


def write_report(metrics: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` (+ ``thumbs/`` and ``metrics.png``) from a metrics dict.

    Images are JPEG thumbnails copied into ``out_dir/thumbs`` and referenced by relative
    paths, so the page shows them when opened from disk and when the folder is moved; each
    links to its full-size original. Returns the page's path.
    """
    out_dir = Path(out_dir)
    thumbs = out_dir / THUMB_DIR
    if thumbs.is_dir():
        shutil.rmtree(thumbs)  # stale thumbnails of an earlier evaluation
    thumbs.mkdir(parents=True)
    inputs, overall, run = metrics["inputs"], metrics["overall"], metrics.get("run") or {}
    images_dir = Path(inputs["images_dir"])

    def thumb(src: Path, name: str) -> str:
        try:
            _thumbnail(src, thumbs / name)
        except DataError:
            return ""
        return f"{THUMB_DIR}/{name}"

    _plot(metrics, out_dir / PLOT_FILE)

    title = run.get("name") or images_dir.name
    settings = metrics.get("settings") or {}
    facts = [
        ("model", run.get("model") or settings.get("model")),
        ("method", run.get("method")),
        ("preset", run.get("preset")),
        ("adapter", settings.get("adapter")),
        (
            "steps / guidance / scheduler",
            " / ".join(
                str(settings[k]) for k in ("steps", "guidance", "scheduler") if settings.get(k)
            )
            or None,
        ),
        ("token", inputs.get("token")),
        (
            "backbones",
            ", ".join(str(v) for k, v in metrics["backbones"].items() if v and k != "device"),
        ),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sdatom eval — {html.escape(title)}</title>",
        f"<style>{PAGE_CSS}</style></head><body>",
    ]
    if metrics.get("random_backbones"):
        parts.append(random_banner())
    parts.append(f"<h1>sdatom eval — {html.escape(title)}</h1>")
    sub = " · ".join(f"{k}: {html.escape(str(v))}" for k, v in facts if v)
    parts.append(f'<p class="sub">{sub}</p>')

    parts.append("<h2>Overall</h2><table><tr><th>metric</th><th>value</th><th>meaning</th></tr>")
    for key, label, text in METRICS:
        value = overall.get(key)
        if value is None and key.startswith("preserve") and not inputs.get("base_images_dir"):
            continue
        if key.startswith("oracle") and key not in overall:
            continue
        parts.append(
            f'<tr><td>{label}</td><td class="num">{fmt(value)}</td>'
            f"<td>{html.escape(text)}</td></tr>"
        )
    parts.append("</table>")
    for key, note in metrics.get("notes", {}).items():
        parts.append(f'<p class="note">note ({html.escape(key)}): {html.escape(note)}</p>')
    parts.append(
        f'<p class="scores">{inputs["n_images"]} images, {inputs["n_prompts"]} prompts, '
        f"{inputs['n_subject_images']} subject photos.</p>"
    )
    parts.append(f'<img class="plot" src="{PLOT_FILE}" alt="metrics plot">')

    parts.append('<h2>Subject photos</h2><div class="grid">')
    for n, src in enumerate(inputs["subject_images"]):
        src = Path(src)
        t = thumb(src, f"subject-{n:02d}.jpg")
        parts.append(_figure(t, _rel(src, out_dir), src.name))
    parts.append("</div>")

    per_image = {im["file"]: im for im in metrics["images"]}
    parts.append("<h2>Samples per prompt</h2>")
    for n, p in enumerate(metrics["prompts"]):
        scores = " · ".join(
            f"{metric_label(k)} {fmt(p.get(k), 3)}" for k, _, _ in METRICS if p.get(k) is not None
        )
        parts.append(
            f'<section class="prompt"><h3>#{n}: {html.escape(p["prompt"])}</h3>'
            f'<p class="scores">CLIP-T text: “{html.escape(p["text"])}” — {scores}</p>'
            '<div class="grid">'
        )
        base_figs = []
        for m, file in enumerate(p["files"]):
            im = per_image[file]
            src = images_dir / file
            t = thumb(src, f"p{n:03d}-{m:02d}.jpg")
            caption = (
                f"seed {im['seed']} · T {fmt(im['clip_t'], 3)} · I {fmt(im['clip_i'], 3)}"
                f" · D {fmt(im['dino'], 3)}"
            )
            parts.append(_figure(t, _rel(src, out_dir), caption))
            if im.get("base_file"):
                bsrc = Path(im["base_file"])
                bt = thumb(bsrc, f"p{n:03d}-{m:02d}-base.jpg")
                bcap = f"base, seed {im['seed']} · preserve {fmt(im.get('preserve_clip_i'), 3)}"
                base_figs.append(_figure(bt, _rel(bsrc, out_dir), bcap))
        parts.append("</div>")
        if base_figs:
            parts.append('<p class="scores">base model, same seeds:</p><div class="grid">')
            parts += base_figs
            parts.append("</div>")
        parts.append("</section>")
    parts.append(
        f'<p class="sub">sdatom {html.escape(str(metrics.get("sdatom_version")))} · '
        f"{html.escape(metrics.get('format', ''))}</p></body></html>"
    )
    page = out_dir / "report.html"
    atomic_write_text(page, "\n".join(parts) + "\n")
    return page
