"""Compare evaluated runs: one table (markdown + HTML) and a plot of their metrics."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

from sdatom.errors import UsageError
from sdatom.eval.common import METRICS, PAGE_CSS, RANDOM_WARNING, fmt, metric_label, random_banner
from sdatom.fileio import atomic_path, atomic_write_text
from sdatom.runs import read_json_object, read_run

__all__ = ["compare", "human_bytes"]

PLOT_FILE = "compare.png"
_INFO_COLUMNS = (
    ("run", "run"),
    ("method", "method"),
    ("preset", "preset"),
    ("trainable_params", "trainable params"),
    ("adapter_bytes", "adapter size"),
    ("train_seconds", "train time"),
    ("steps", "steps"),
)


def human_bytes(n: object) -> str:
    """``1536`` -> ``"1.5 KiB"``; '—' when unknown."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _human_seconds(s: object) -> str:
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return "—"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    minutes, seconds = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def _read_run(run_dir: Path) -> dict:
    """One row of the table: the run's summary and its eval/metrics.json."""
    run = read_run(run_dir, need="summary")
    metrics_file = run_dir / "eval" / "metrics.json"
    if not metrics_file.is_file():
        raise UsageError(
            f"run {run_dir.name} has no eval/metrics.json: run `sdatom eval --run {run_dir}` first"
        )
    summary = run.summary
    metrics = read_json_object(metrics_file, f"re-run `sdatom eval --run {run_dir}`")
    return {
        "run": run_dir.name,
        "dir": str(run_dir),
        "method": summary.get("method"),
        "preset": summary.get("preset"),
        "model": summary.get("model"),
        "trainable_params": summary.get("trainable_params"),
        "adapter_bytes": summary.get("adapter_bytes"),
        "train_seconds": summary.get("train_seconds"),
        "steps": summary.get("steps"),
        "random_backbones": bool(metrics.get("random_backbones")),
        "backbones": {k: v for k, v in (metrics.get("backbones") or {}).items() if k != "device"},
        "n_images": (metrics.get("inputs") or {}).get("n_images"),
        "metrics": dict(metrics.get("overall") or {}),
        "report": str(run_dir / "eval" / "report.html"),
    }


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "trainable_params":
        return f"{value:,}" if isinstance(value, int) else "—"
    if key == "adapter_bytes":
        return human_bytes(value)
    if key == "train_seconds":
        return _human_seconds(value)
    if key in row["metrics"] or key in {k for k, _, _ in METRICS}:
        return fmt(row["metrics"].get(key))
    return "—" if value is None else str(value)


def _markdown(rows: list[dict], columns: list[tuple[str, str]], notes: list[str]) -> str:
    lines = []
    if any(r["random_backbones"] for r in rows):
        lines += [f"> **{RANDOM_WARNING}** (at least one run was scored with them)", ""]
    lines.append("| " + " | ".join(label for _, label in columns) + " |")
    lines.append(
        "|"
        + "|".join("---:" if k not in ("run", "method", "preset") else "---" for k, _ in columns)
        + "|"
    )
    for row in rows:
        lines.append(
            "| " + " | ".join(_cell(row, k).replace("|", "\\|") for k, _ in columns) + " |"
        )
    lines += [""] + [f"- {note}" for note in notes]
    lines.append("- CLIP-T is a raw cosine (~0.3), not x100 as torchmetrics' CLIPScore.")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], metric_keys: list[str], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 3]})
    colors = {"atoms": "#c44e52", "lora": "#4c72b0", "full": "#55a868"}
    for row in rows:
        x, y = row["metrics"].get("clip_i"), row["metrics"].get("clip_t")
        if x is None or y is None:
            continue
        ax1.scatter([x], [y], s=60, color=colors.get(row["method"] or "", "#8172b2"))
        ax1.annotate(row["run"], (x, y), fontsize=9, xytext=(4, 4), textcoords="offset points")
    ax1.set_xlabel("CLIP-I (subject fidelity)")
    ax1.set_ylabel("CLIP-T (prompt fidelity)")
    ax1.set_title("runs: text vs subject fidelity")
    ax1.margins(0.25)

    bar_keys = [k for k in metric_keys if not k.startswith("vendi")]
    width = 0.8 / max(1, len(rows))
    for n, row in enumerate(rows):
        xs = [i + n * width for i in range(len(bar_keys))]
        values = [row["metrics"].get(k) or 0.0 for k in bar_keys]
        ax2.bar(xs, values, width=width, label=row["run"])
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(bar_keys))])
    ax2.set_xticklabels([metric_label(k) for k in bar_keys], rotation=15, fontsize=8)
    ax2.legend(fontsize=8)
    ax2.set_title("metrics per run")
    if any(r["random_backbones"] for r in rows):
        fig.suptitle("RANDOM BACKBONES — meaningless numbers", color="#c00", fontweight="bold")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")


def _html(rows: list[dict], columns: list[tuple[str, str]], notes: list[str], out_dir: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>sdatom compare</title>',
        f"<style>{PAGE_CSS}</style></head><body>",
    ]
    if any(r["random_backbones"] for r in rows):
        parts.append(random_banner())
    parts.append(f"<h1>sdatom compare — {len(rows)} runs</h1>")
    parts.append("<table><tr>" + "".join(f"<th>{html.escape(lb)}</th>" for _, lb in columns))
    for row in rows:
        cells = []
        for key, _ in columns:
            text = html.escape(_cell(row, key))
            if key == "run" and Path(row["report"]).is_file():
                link = Path(os.path.relpath(row["report"], out_dir)).as_posix()
                text = f'<a href="{html.escape(link)}">{text}</a>'
            cls = "" if key in ("run", "method", "preset") else ' class="num"'
            cells.append(f"<td{cls}>{text}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append(
        '<p class="scores">CLIP-T is a raw cosine (~0.3), not x100 as torchmetrics\' CLIPScore.</p>'
    )
    parts.append(f'<img class="plot" src="{PLOT_FILE}" alt="comparison plot">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def compare(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict:
    """Tabulate evaluated runs side by side; write compare.md, compare.html and compare.png.

    Each run folder needs ``train_summary.json`` and ``eval/metrics.json``. Returns
    ``{"runs": [...], "columns": [[key, label], ...], "notes": [...], "markdown": str,
    "files": {...}}``; the CLI prints ``markdown``.

    Raises:
        UsageError: no runs, a run folder is missing, or a run has not been evaluated yet.
    """
    if not run_dirs:
        raise UsageError("no runs to compare: pass one or more --run folders")
    rows = [_read_run(Path(d)) for d in run_dirs]
    names = [r["run"] for r in rows]
    for row in rows:
        if names.count(row["run"]) > 1:  # same folder name under different parents
            row["run"] = str(Path(row["dir"]))

    metric_keys = [k for k, _, _ in METRICS if any(r["metrics"].get(k) is not None for r in rows)]
    columns = list(_INFO_COLUMNS) + [(k, metric_label(k)) for k in metric_keys]
    notes = []
    if any(r["random_backbones"] for r in rows):
        random_runs = ", ".join(r["run"] for r in rows if r["random_backbones"])
        notes.append(f"{RANDOM_WARNING}: {random_runs}")
    if len({json.dumps(r["backbones"], sort_keys=True) for r in rows}) > 1:
        notes.append("runs were scored with different backbones: their metrics are not comparable")
    if len({r["n_images"] for r in rows}) > 1:
        notes.append("runs were scored on different numbers of images")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(rows, columns, notes)
    _plot(rows, metric_keys, out_dir / PLOT_FILE)
    atomic_write_text(out_dir / "compare.md", markdown)
    atomic_write_text(out_dir / "compare.html", _html(rows, columns, notes, out_dir))
    return {
        "runs": rows,
        "columns": [list(c) for c in columns],
        "notes": notes,
        "markdown": markdown,
        "files": {
            "markdown": str(out_dir / "compare.md"),
            "html": str(out_dir / "compare.html"),
            "plot": str(out_dir / PLOT_FILE),
        },
    }
