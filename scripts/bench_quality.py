"""Quality on the toy world: atoms vs LoRA vs full fine-tuning, scored by the exact oracle.

    python scripts/bench_quality.py --quick            # <= 30 min on a 2-core CPU
    python scripts/bench_quality.py --full             # every subject, method, lr and seed
    python scripts/bench_quality.py --smoke            # seconds: one tiny run (tests)

Per toy subject, every method trains on the same instance pictures with the same steps and
seeds (sdatom train's defaults for --model toy unless overridden), then samples the toy protocol
(the subject on unseen backgrounds at each position, the class word alone) and ordinary world
prompts. The oracle scores subject fidelity, text alignment, drift, world knowledge and class
diversity; the toy CLIP scores CLIP-T and CLIP-I. Runs are cached in --out, one folder per toy
model (named by its weights' fingerprint: a rerun continues, a re-pretrained model starts
afresh), and QUALITY.md gets each method at its best learning rate with 95 % intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import write_report_section

from sdatom.config import build_config
from sdatom.toyworld import quality, subjects, world

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS_DIR = ROOT / "data" / "toyworld"
CONVS = ("conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out", "proj_in", "proj_out")
# name -> (train options, learning rates tried)
METHODS: dict[str, tuple[dict, tuple[float, ...]]] = {
    "atoms": ({"method": "atoms", "preset": "atoms"}, (3e-3, 1e-2, 3e-2)),
    "atoms-paper": ({"method": "atoms", "preset": "atoms-paper"}, (3e-3, 1e-2, 3e-2)),
    "atoms-oc": ({"method": "atoms", "preset": "atoms-oc"}, (3e-4, 1e-3, 3e-3)),
    "atoms-attn": ({"method": "atoms", "preset": "atoms-attn"}, (3e-4, 1e-3, 3e-3)),
    "atoms-attn-lasso": (
        {
            "method": "atoms",
            "preset": "custom:attn-lasso",
            "atoms": {"coder": "lasso", "channel_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        },
        (3e-4, 1e-3, 3e-3),
    ),
    "lora-attn": ({"method": "lora"}, (1e-4, 3e-4, 1e-3)),
    "lora-conv": ({"method": "lora", "lora_targets": CONVS}, (1e-4, 3e-4, 1e-3)),
    "full": ({"method": "full"}, (1e-5, 3e-5, 1e-4)),
}
QUICK_METHODS = ("atoms-attn", "atoms", "lora-attn", "full")
TOKEN_CHOICES = {"on": (True,), "off": (False,), "both": (True, False)}
WORLD_PROMPTS = 16
# Student's t 97.5 % quantiles for few degrees of freedom; more use t95's expansion.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t95(df: int) -> float:
    """The t quantile of a two-sided 95 % interval with ``df`` degrees of freedom: the table
    above, then the Cornish-Fisher expansion around the normal's 1.96 (within 0.001 from df 10,
    where the normal alone would make an eleven-run interval 12 % too narrow)."""
    if df in T95:
        return T95[df]
    z, v = 1.959964, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for a single value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = t95(len(values) - 1)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def world_objects(seed: int = 7) -> list[world.ToyObject]:
    return quality.held_in_prompts(WORLD_PROMPTS, seed)


def scores_dir(out: Path, guidance: float) -> Path:
    """Where the scores of samples drawn with ``guidance`` are cached (the trained runs, which do
    not depend on how they are sampled, are shared under ``out/runs``)."""
    return out / f"cfg{guidance:g}"


def score_run(
    run_dir: Path,
    subject: subjects.ToySubject,
    n: int,
    backbones,
    guidance: float,
    sample_steps: int = 30,
) -> dict:
    """Sample the protocol and world prompts of a trained run and score them."""
    from sdatom.eval.metrics import clip_i, clip_t
    from sdatom.runs import load_run_pipeline

    pipe = load_run_pipeline(run_dir, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    protocol = [p for p, _ in subjects.protocol(subject)]
    prompts = [p for p in protocol for _ in range(n)] + [world.caption(o) for o in world_objects()]
    images = quality.sample_images(pipe, prompts, seed=0, steps=sample_steps, guidance=guidance)
    overall, rows = quality.oracle_metrics(subject, prompts, images, "sks")
    # CLIP-T / CLIP-I with the toy CLIP, on the subject prompts only.
    idx = [i for i, r in enumerate(rows) if r["role"] == "subject"]
    generated = [images[i] for i in idx]
    overall["clip_t"] = statistics.fmean(clip_t(backbones, generated, [prompts[i] for i in idx]))
    overall["clip_i"] = clip_i(backbones, generated, subject_images(subject))
    return overall


def subject_folder(out: Path, subject: subjects.ToySubject, captions: str) -> Path:
    """The subject's pictures; with ``captions="full"`` a copy with one caption per picture
    naming its position and background (``a photo of sks square on the left on a yellow
    background``), as a user who captions their photos would write."""
    if captions == "default":
        return SUBJECTS_DIR / subject.name
    folder = out / "subjects-captioned" / subject.name
    folder.mkdir(parents=True, exist_ok=True)
    for i, obj in enumerate(subject.objects()):
        shutil.copyfile(SUBJECTS_DIR / subject.name / f"{i:02d}.png", folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(world.caption(obj, subject="sks") + "\n")
    return folder


def subject_images(subject: subjects.ToySubject):
    from PIL import Image

    return [
        Image.open(p).convert("RGB") for p in sorted((SUBJECTS_DIR / subject.name).glob("*.png"))
    ]


def base_scores(out: Path, guidance: float, sample_steps: int = 30) -> dict:
    """World knowledge of the base model on the same world prompts (the reference)."""
    from sdatom.models import load_pipeline

    cached = scores_dir(out, guidance) / "base.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    pipe = load_pipeline("toy", device="cpu")
    objs = world_objects()
    images = quality.sample_images(
        pipe, [world.caption(o) for o in objs], seed=0, steps=sample_steps, guidance=guidance
    )
    _, rows = quality.oracle_metrics(
        subjects.SUBJECTS[0], [world.caption(o) for o in objs], images, "sks"
    )
    result = {"oracle_world": statistics.fmean(r["correct"] for r in rows)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def words_ceiling(
    out: Path, subject: subjects.ToySubject, n: int, guidance: float, sample_steps: int = 30
) -> float:
    """The base model's fidelity when the subject's look is written out in words (``a pink and
    cyan striped square`` for ``sks square``), on the same protocol prompts and seeds: what a
    token that means exactly those words could reach."""
    from sdatom.models import load_pipeline

    cached = scores_dir(out, guidance) / "words" / f"{subject.name}-n{n}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["fidelity"]
    pipe = load_pipeline("toy", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    named = f"a {subject.appearance} {subject.shape}"
    prompts = [
        p.replace(f"sks {subject.shape}", named)
        for p, role in subjects.protocol(subject)
        if role == "subject"
        for _ in range(n)
    ]
    images = quality.sample_images(pipe, prompts, seed=0, steps=sample_steps, guidance=guidance)
    _, rows = quality.oracle_metrics(subject, prompts, images, "sks")
    fidelity = statistics.fmean(float(r["is_subject"]) for r in rows)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"fidelity": fidelity, "prompts": len(prompts)}))
    return fidelity


def one_run(
    out: Path,
    subject: subjects.ToySubject,
    name: str,
    lr: float,
    seed: int,
    steps: int,
    n: int,
    backbones,
    guidance: float,
    extra: dict | None = None,
    token: bool = True,
    captions: str = "default",
    token_vectors: int = 1,
) -> dict:
    from sdatom.train import train

    # Runs that train the token's embedding (with how many vectors) or use per-image captions
    # are tagged: the cache keeps each kind apart.
    vectors = f"{token_vectors}v" if token and token_vectors > 1 else ""
    variant = ("-token" if token else "") + vectors + ("-captions" if captions == "full" else "")
    # Steps and images per prompt are in the tag too, so a changed default never reuses a run.
    tag = f"{subject.name}/{name}{variant}-lr{lr:g}-s{seed}-st{steps}-n{n}"
    result_file = scores_dir(out, guidance) / "results" / f"{tag.replace('/', '__')}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    options, _ = METHODS[name]
    run_dir = out / "runs" / tag
    config = build_config(
        None,
        model="toy",
        subject=str(subject_folder(out, subject, captions)),
        class_name=subject.class_name,
        output=str(run_dir),
        lr=lr,
        seed=seed,
        steps=steps,
        report_to="none",
        validation_every=0,
        checkpoint_every=0,
        train_token=token,
        token_vectors=token_vectors,
        **options,
        **(extra or {}),
    )
    summary_file = run_dir / "train_summary.json"
    if not summary_file.is_file():  # a finished run is reused: only its scores are redone
        train(config, overwrite=True, progress_bar=False)
    summary = json.loads(summary_file.read_text())
    scores = score_run(
        run_dir, subject, n, backbones, guidance, (extra or {}).get("class_sample_steps", 30)
    )
    label = name + (" + token" if token else "") + (f" x{token_vectors}" if vectors else "")
    label += " + captions" if captions == "full" else ""
    record = {
        "subject": subject.name,
        "method": label,
        "lr": lr,
        "seed": seed,
        "trainable_params": summary["trainable_params"],
        "train_seconds": summary["train_seconds"],
        "file_bytes": summary["adapter_bytes"],
        **scores,
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)
    return record


KEYS = (
    "oracle_fidelity",
    "oracle_alignment_background",
    "oracle_alignment_position",
    "oracle_alignment",
    "oracle_drift",
    "oracle_world",
    "oracle_class_diversity",
    "clip_t",
    "clip_i",
)


def summarise(records: list[dict]) -> dict:
    """Per method and lr: mean and 95 % interval of each score; the best lr per method."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    table = {}
    for (method, lr), rows in groups.items():
        entry = {k: interval([r.get(k) for r in rows]) for k in KEYS}
        entry["n_runs"] = len(rows)
        for k in ("trainable_params", "train_seconds", "file_bytes"):
            entry[k] = statistics.fmean(r[k] for r in rows)
        fid, ali, dri = (
            entry[k][0] for k in ("oracle_fidelity", "oracle_alignment_background", "oracle_drift")
        )
        entry["score"] = fid * ali * (1 - dri)  # ali: background alignment
        table.setdefault(method, {})[lr] = entry
    best = {m: max(lrs, key=lambda lr: lrs[lr]["score"]) for m, lrs in table.items()}
    return {"table": table, "best_lr": best}


def write_report(
    path: Path,
    summary: dict,
    base: dict,
    command: str,
    seconds: float,
    section: str,
    ceilings: dict[str, float],
    records: list[dict],
    guidance: float,
) -> None:
    def cell(v: tuple[float, float]) -> str:
        return "—" if math.isnan(v[0]) else f"{v[0]:.2f} ± {v[1]:.2f}"

    title = "Atoms, LoRA and full fine-tuning on the toy subjects"
    if section != "bench_quality":
        title += f" ({section.removeprefix('bench_quality_').replace('_', ' ')})"
    lines = [
        f"## {title}",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min on this machine: 2-core CPU, no GPU).",
        "",
        "Each method at its best learning rate (the highest fidelity × background alignment ×",
        "(1 − drift)); mean ± 95 % t-interval over subjects × seeds. Fidelity: share of",
        "subject-prompt images whose object has the subject's shape, colours and texture;",
        "alignment on unseen backgrounds: the prompted background, position, and both; drift:",
        "class-prompt images showing the",
        "subject; world: attribute accuracy on ordinary prompts (base model "
        f"{base['oracle_world']:.2f}); diversity: chance two class images differ in appearance.",
        f"Every sample: the model's scheduler, 30 steps, guidance {guidance:g}. All read by the",
        "exact oracle; CLIP-T / CLIP-I by the toy CLIP.",
        "",
        "| method | lr | runs | fidelity | background | position | both | drift | world | "
        "diversity | CLIP-T | CLIP-I | trainable | train s | file |",
        "|---|---|---:|---|---|---|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for method, lr in summary["best_lr"].items():
        e = summary["table"][method][lr]
        lines.append(
            f"| {method} | {lr:g} | {e['n_runs']} | "
            + " | ".join(cell(e[k]) for k in KEYS)
            + f" | {e['trainable_params']:,.0f} | {e['train_seconds']:.0f} | "
            f"{e['file_bytes'] / 1e3:,.0f} KB |"
        )
    lines += [
        "",
        "Every learning rate tried:",
        "",
        "| method | lr | runs | fidelity | background | position | both | drift | world |",
        "|---|---|---:|---|---|---|---|---|---|",
    ]
    for method, lrs in summary["table"].items():
        for lr, e in sorted(lrs.items()):
            lines.append(
                f"| {method} | {lr:g} | {e['n_runs']} | "
                + " | ".join(cell(e[k]) for k in KEYS[:6])
                + " |"
            )
    if len(ceilings) > 1:
        methods = list(summary["best_lr"])
        lines += [
            "",
            'Fidelity per subject (each method at its best lr, mean over seeds); "in words": the',
            "base model asked for the subject's look in words on the same prompts and seeds",
            "(`a pink and cyan striped square` for `sks square`), what a token could reach:",
            "",
            "| subject | in words | " + " | ".join(methods) + " |",
            "|---|---:|" + "---:|" * len(methods),
        ]
        for name, ceiling in ceilings.items():
            cells = []
            for method in methods:
                lr = summary["best_lr"][method]
                got = [
                    r["oracle_fidelity"]
                    for r in records
                    if (r["subject"], r["method"], r["lr"]) == (name, method, lr)
                ]
                cells.append(f"{statistics.fmean(got):.2f}" if got else "—")
            lines.append(f"| {name} | {ceiling:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    write_report_section(path, section, lines)


def plot(path: Path, summary: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, lr in summary["best_lr"].items():
        e = summary["table"][method][lr]
        (fx, ex), (fy, ey) = e["oracle_fidelity"], e["oracle_alignment"]
        ax.errorbar(fx, fy, xerr=ex, yerr=ey, fmt="o", capsize=3, label=f"{method} (lr {lr:g})")
    ax.set_xlabel("subject fidelity (oracle)")
    ax.set_ylabel("text alignment on unseen backgrounds (oracle)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("toy world: each method at its best lr, 95 % intervals")
    fig.tight_layout()
    fig.savefig(path)


def _lrs_arg(text: str) -> str | tuple[float, ...]:
    """`--lrs`: `default`, `all`, or a comma-separated list of learning rates."""
    if text in ("default", "all"):
        return text
    try:
        lrs = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give default, all, or learning rates such as 1e-3,3e-3"
        ) from None
    if any(lr <= 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"{text!r}: learning rates must be positive")
    return lrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 subjects, 4 methods, default lr")
    mode.add_argument("--full", action="store_true", help="all subjects, methods, 3 lr, 3 seeds")
    mode.add_argument("--smoke", action="store_true", help="one subject, one method, 2 steps")
    ap.add_argument("--subjects", type=int, default=None, help="use the first N subjects")
    ap.add_argument(
        "--only", nargs="*", default=None, help="of those, only these subjects (by name)"
    )
    ap.add_argument("--methods", nargs="*", default=None, choices=list(METHODS))
    ap.add_argument(
        "--lrs",
        type=_lrs_arg,
        default=None,
        help="default (each method's), all (its three), or learning rates: 1e-3,3e-3",
    )
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="default: sdatom's for --model toy")
    ap.add_argument("-n", type=int, default=None, help="images per protocol prompt")
    ap.add_argument(
        "--token",
        choices=("on", "off", "both"),
        default="on",
        help="train the token's embedding beside each method (on: sdatom's toy default)",
    )
    ap.add_argument(
        "--token-vectors",
        type=int,
        default=None,
        help="vectors in the trained token (default: sdatom's for --model toy)",
    )
    ap.add_argument(
        "--captions",
        choices=("default", "full"),
        default="default",
        help="full: one caption per subject picture naming its position and background",
    )
    ap.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance of every sample (default: sdatom sample's for the toy)",
    )
    ap.add_argument("--out", default="runs/bench-quality")
    ap.add_argument("--report", default=str(ROOT / "QUALITY.md"))
    ap.add_argument(
        "--section",
        default="bench_quality",
        help="the report's section to (re)write: several tables can live in one file",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from sdatom.toyworld.backbones import toy_backbones

    if args.smoke:
        defaults = dict(subjects=1, methods=["atoms"], lrs="default", seeds=1, steps=2, n=1)
    elif args.full:
        defaults = dict(
            subjects=len(subjects.SUBJECTS),
            methods=list(METHODS),
            lrs="all",
            seeds=3,
            steps=None,
            n=4,
        )
    else:
        defaults = dict(
            subjects=2, methods=list(QUICK_METHODS), lrs="default", seeds=1, steps=None, n=2
        )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from sdatom.models import weights_fingerprint

    # Runs are cached per toy model: a re-pretrained model starts a fresh cache.
    out = Path(args.out) / f"toy-{weights_fingerprint('toy')}"
    out.mkdir(parents=True, exist_ok=True)
    backbones = toy_backbones("cpu")
    started = time.perf_counter()
    # --smoke: a few class images and denoising steps, so that it runs in seconds.
    extra = {"num_class_images": 2, "class_sample_steps": 3} if args.smoke else {}
    from sdatom.toyworld.model import SAMPLE_GUIDANCE

    guidance = SAMPLE_GUIDANCE if args.guidance is None else args.guidance
    base = base_scores(out, guidance, extra.get("class_sample_steps", 30))
    picks = [subjects.SUBJECTS[i] for i in _spread(args.subjects)]
    if args.only is not None:
        unknown = set(args.only) - {s.name for s in picks}
        if unknown:
            sys.exit(f"--only: {', '.join(sorted(unknown))}: not among the {len(picks)} subjects")
        picks = [s for s in picks if s.name in args.only]
    from sdatom.toyworld.model import TRAIN_DEFAULTS

    steps = TRAIN_DEFAULTS["steps"] if args.steps is None else args.steps
    records = []
    for subject in picks:
        for name in args.methods:
            if isinstance(args.lrs, tuple):
                lrs = args.lrs
            elif args.lrs == "all":
                lrs = METHODS[name][1]
            elif name.startswith("atoms-attn"):
                lrs = (TRAIN_DEFAULTS["lr"],)
            else:
                lrs = (METHODS[name][1][1],)
            for lr in lrs:
                for seed in range(args.seeds):
                    for token in TOKEN_CHOICES[args.token]:
                        records.append(
                            one_run(
                                out,
                                subject,
                                name,
                                lr,
                                seed,
                                steps,
                                args.n,
                                backbones,
                                guidance,
                                extra,
                                token,
                                args.captions,
                                args.token_vectors or TRAIN_DEFAULTS.get("token_vectors", 1),
                            )
                        )
    summary = summarise(records)
    if not args.smoke:
        ceilings = {s.name: words_ceiling(out, s, args.n, guidance) for s in picks}
        seconds = time.perf_counter() - started
        command = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
        write_report(
            Path(args.report),
            summary,
            base,
            command.strip(),
            seconds,
            args.section,
            ceilings,
            records,
            guidance,
        )
        suffix = args.section.removeprefix("bench_quality").replace("_", "-")
        plot(Path(args.report).with_name(Path(args.report).stem + suffix + ".png"), summary)
    if args.json:
        print(json.dumps({"base": base, **summary}, indent=1, default=str))


def _spread(k: int) -> list[int]:
    """k subject indices spread over the list (different shapes and textures first)."""
    order = [1, 4, 2, 7, 0, 5, 3, 6, 8, 9, 10]
    return sorted(order[: min(k, len(order))])


if __name__ == "__main__":
    main()
