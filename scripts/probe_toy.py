"""What limits the toy subjects: read, attribute by attribute, what the models draw.

    python scripts/probe_toy.py base                 # the base model, before any tuning
    python scripts/probe_toy.py text                 # what the text encoder makes of words
    python scripts/probe_toy.py run --tag T --method atoms --lr 1e-3 --steps 900 --every 300

``text`` measures how far apart the text encoder puts prompts that differ in one word
(DreamBooth's instance and class prompts, two colours, two positions): the UNet can only tell
apart what the text encoder does. ``base`` asks the shipped toy model for held-in two-tone
objects (which part of a two-tone look fails: shape, the colour pair or the texture) and for
two subjects' looks named in words (can the base model draw them at all). ``run`` trains one
method on one subject with sdatom's toy defaults plus the options given, then scores the toy
protocol with the oracle at every checkpoint (one training run gives the curve over steps).
``vae`` reads each subject's photos after the toy VAE's round trip.
``curve`` summarises the runs in ``--out``: mean fidelity per step, and with one checkpoint per
subject picked by the oracle (what early stopping could reach at best) or by the toy CLIP-I.
``--captions full`` writes per-image captions that name the position and background of each
instance picture (``a photo of sks square on the left on a yellow background``). Every result
is printed and appended to ``OUT/probe.jsonl``. Deterministic: the same command gives the same
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import torch

from sdatom.toyworld import oracle, quality, subjects, world


def emit(out: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out / "probe.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read(pipe, prompts: list[str], seed: int) -> list[oracle.Reading]:
    images = quality.sample_images(pipe, prompts, seed=seed, steps=30, guidance=7.5)
    return [oracle.read(im) for im in images]


def probe_base(out: Path, n: int, names: list[str]) -> None:
    from sdatom.models import load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(5)
    objs = [world.sample_object(rng, two_tone=1.0) for _ in range(n)]
    seen = read(pipe, [world.caption(o) for o in objs], seed=100)
    pairs = list(zip(objs, seen, strict=True))

    def share(test) -> float:
        return round(sum(test(o, r) for o, r in pairs) / len(pairs), 3)

    def same_pair(o, r) -> bool:
        return r.colors is not None and set(r.colors) == set(o.colors)

    emit(
        out,
        {
            "probe": "base two-tone held-in prompts",
            "n": n,
            "shape": share(lambda o, r: r.shape == o.shape),
            "two colours seen": share(lambda o, r: r.colors is not None and len(r.colors) == 2),
            "colour pair": share(
                lambda o, r: r.colors is not None and set(r.colors) == set(o.colors)
            ),
            "texture": share(lambda o, r: r.texture == o.texture),
            "appearance": share(lambda o, r: r.appearance == o.appearance),
        },
    )
    for name in names:
        s = subjects.subject(name)
        prompts = [
            world.prompt(s.shape, appearance=s.appearance, background=b, position=p)
            for b in ("green", "yellow", "blue")
            for p in world.POSITIONS
            for _ in range(2)
        ]
        seen = read(pipe, prompts, seed=300)
        emit(
            out,
            {
                "probe": f"base, the subject's look in words: {name}",
                "n": len(prompts),
                "subject drawn": round(
                    sum((r.shape, r.appearance) == (s.shape, s.appearance) for r in seen)
                    / len(seen),
                    3,
                ),
                "looks": Counter(f"{r.appearance} {r.shape}" for r in seen).most_common(4),
            },
        )


def probe_text(out: Path) -> None:
    from sdatom.families import family_of
    from sdatom.models import load_pipeline

    pipe = load_pipeline("toy", device="cpu")

    def hidden(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return family_of(pipe).encode_prompts(pipe, [prompt], torch.device("cpu")).hidden[0]

    # Pairs of prompts of the same token length that differ in one word: how far apart the
    # UNet's text inputs are, at the word and summed over all 77 positions.
    pairs = [
        ("a photo of sks square", "a photo of a square"),  # DreamBooth's instance vs class
        ("a photo of a red square", "a photo of a blue square"),
        ("a photo of a red square", "a photo of a pink square"),
        ("a photo of a square on the left", "a photo of a square on the right"),
    ]
    for one, other in pairs:
        ids = [pipe.tokenizer(p).input_ids for p in (one, other)]
        assert len(ids[0]) == len(ids[1]), (one, other)
        at = next(i for i, (x, y) in enumerate(zip(*ids, strict=True)) if x != y)
        moved = (hidden(one) - hidden(other)).norm(dim=-1)
        emit(
            out,
            {
                "probe": "text encoder: hidden-state distance between two prompts",
                "prompts": [one, other],
                "at the word": round(moved[at].item(), 2),
                "summed over 77 positions": round(moved.sum().item(), 1),
                "hidden-state norm": round(hidden(other)[at].norm().item(), 2),
            },
        )


def subject_folder(folder: Path, s: subjects.ToySubject, captions: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, obj in enumerate(s.objects()):
        world.draw(obj).save(folder / f"{i:02d}.png")
        if captions != "default":
            text = world.caption(obj, subject="sks", position=captions == "full")
            (folder / f"{i:02d}.txt").write_text(text + "\n")
    return folder


def probe_run(out: Path, a: argparse.Namespace) -> None:
    from PIL import Image
    from safetensors.torch import load_file

    from sdatom.config import build_config
    from sdatom.data import instance_prompt
    from sdatom.eval.metrics import clip_i, clip_t
    from sdatom.runs import load_run_pipeline
    from sdatom.token_embedding import split_checkpoint, write_into
    from sdatom.toyworld.backbones import toy_backbones
    from sdatom.train import train

    root = out / a.tag
    s = subjects.subject(a.subject)
    options = {"method": a.method}
    folder = subject_folder(root / "subject", s, a.captions)
    keys = ("preset", "prior_loss_weight", "num_class_images", "train_token", "token_lr")
    for key in (*keys, "token_vectors"):
        if getattr(a, key) is not None:
            options[key] = getattr(a, key)
    config = build_config(
        None,
        model="toy",
        subject=str(folder),
        class_name=s.class_name,
        output=str(root / "run"),
        lr=a.lr,
        seed=a.seed,
        steps=a.steps,
        report_to="none",
        validation_every=0,
        checkpoint_every=a.every,
        keep_checkpoints=max(1, a.steps // a.every),
        **options,
    )
    if not (root / "run" / "train_summary.json").is_file():
        train(config, overwrite=True, progress_bar=False)
    seconds = json.loads((root / "run" / "train_summary.json").read_text())["train_seconds"]
    protocol = [p for p, _ in subjects.protocol(s)]
    prompts = [p for p in protocol for _ in range(a.n)]
    prompts += [world.caption(o) for o in quality.held_in_prompts(16, 7)]
    # The training caption itself: fidelity there tells under-fitting (the subject is not drawn
    # even where it was trained) from a failure to carry it into new contexts.
    trained = [instance_prompt("sks", s.class_name)] * 8
    # CLIP-I / CLIP-T by the toy CLIP on the subject prompts: what a user without an oracle
    # could read off each checkpoint (does picking the checkpoint by them pick the best one?).
    backbones = toy_backbones("cpu")
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    for ckpt in sorted((root / "run" / "checkpoints").glob("step-*")):
        state = json.loads((ckpt / "state.json").read_text())
        # The finished run, unmerged (a multi-vector token is loaded once per pipeline); the
        # checkpoint's trainable tensors are copied into it.
        pipe = load_run_pipeline(root / "run", device="cpu", merge=False)
        pipe.set_progress_bar_config(disable=True)
        # LoRA layers name their adapter (``lora_A.default_0.weight``); checkpoints do not.
        tensors = {
            re.sub(r"\.default(_\d+)?\.", ".", k): v
            for k, v in [*pipe.unet.named_parameters(), *pipe.unet.named_buffers()]
        }
        with torch.no_grad():
            saved, token = split_checkpoint(load_file(ckpt / "trainable.safetensors"))
            if token:
                write_into(pipe, token, "sks")
            for k, v in saved.items():
                tensors[k].copy_(v)
        images = quality.sample_images(pipe, prompts, seed=0, steps=30, guidance=7.5)
        overall, rows = quality.oracle_metrics(s, prompts, images, "sks")
        idx = [i for i, r in enumerate(rows) if r["role"] == "subject"]
        generated, asked = [images[i] for i in idx], [prompts[i] for i in idx]
        overall["clip_i"] = clip_i(backbones, generated, photos)
        overall["clip_t"] = statistics.fmean(clip_t(backbones, generated, asked))
        fit = quality.sample_images(pipe, trained, seed=500, steps=30, guidance=7.5)
        overall["fidelity_trained_prompt"] = quality.oracle_metrics(s, trained, fit, "sks")[0][
            "oracle_fidelity"
        ]
        looks = Counter(f"{r['seen']} {r['shape']}" for r in rows if r["role"] == "subject")
        emit(
            out,
            {
                "tag": a.tag,
                "subject": s.name,
                "method": a.method,
                "preset": config.preset if a.method == "atoms" else None,
                "lr": a.lr,
                "captions": a.captions,
                "prior_loss_weight": config.prior_loss_weight,
                "train_token": config.train_token,
                "token_lr": config.token_lr if config.train_token else None,
                "token_vectors": config.token_vectors if config.train_token else None,
                "step": state["step"],
                "train_seconds": round(seconds),
                **{k: round(v, 3) for k, v in overall.items() if v is not None},
                "looks": looks.most_common(3),
            },
        )


def probe_vae(out: Path) -> None:
    """Each subject's instance photos through the toy VAE and back: can the latent space hold
    the subject's look at all? (The oracle reads the reconstructions.)"""
    from sdatom.models import load_pipeline

    vae = load_pipeline("toy", device="cpu").vae
    for s in subjects.SUBJECTS:
        reconstructions, _ = quality.vae_round_trip(vae, [world.draw(o) for o in s.objects()])
        reads = [oracle.read(im) for im in reconstructions]
        look = (s.shape, s.texture, tuple(s.colors))
        wrong = [r.appearance for r in reads if (r.shape, r.texture, r.colors) != look]
        right = len(reads) - len(wrong)
        emit(out, {"vae": s.name, "right": right, "of": len(reads), "wrong": wrong})


def curve_summary(records: list[dict]) -> dict:
    """Fidelity over training steps from ``run`` records (one run per subject, scored at every
    checkpoint): the mean per step over the subjects scored at every step, and the mean when
    each subject keeps one checkpoint, picked by the oracle's fidelity (the best any early
    stopping could do) or by what a user can read without an oracle (the toy CLIP-I)."""
    runs: dict[str, dict[int, dict]] = {}
    for r in records:
        runs.setdefault(r["subject"], {})[r["step"]] = r
    steps = sorted(set.intersection(*(set(by_step) for by_step in runs.values())))

    mean = statistics.fmean
    keys = ("oracle_fidelity", "oracle_alignment_position", "oracle_world", "clip_i")
    per_step = {t: {k: mean(run[t][k] for run in runs.values()) for k in keys} for t in steps}
    picks = {
        name: mean(max((r[t] for t in steps), key=key)["oracle_fidelity"] for r in runs.values())
        for name, key in (
            ("oracle", lambda r: r["oracle_fidelity"]),
            ("clip_i", lambda r: r["clip_i"]),
        )
    }
    return {"subjects": len(runs), "steps": steps, "per_step": per_step, "picked": picks}


def print_curve(out: Path) -> None:
    records = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    summary = curve_summary([r for r in records if "step" in r])
    print(f"{summary['subjects']} subjects")
    print("step  fidelity  position  world  CLIP-I")
    for t, m in summary["per_step"].items():
        print(
            f"{t:4d}  {m['oracle_fidelity']:8.2f}  {m['oracle_alignment_position']:8.2f}"
            f"  {m['oracle_world']:5.2f}  {m['clip_i']:6.3f}"
        )
    for name, value in summary["picked"].items():
        print(f"one checkpoint per subject, picked by {name}: fidelity {value:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/probe-toy")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("text", help="how far words move the text encoder's hidden states")
    b = sub.add_parser("base", help="what the base model draws")
    b.add_argument("-n", type=int, default=60, help="two-tone prompts")
    b.add_argument(
        "--subjects",
        nargs="*",
        default=["pink-cyan-striped-square", "pink-cyan-checkered-circle"],
        help="subjects whose look is asked for in words ('all': every toy subject)",
    )
    sub.add_parser("vae", help="the subjects' photos through the toy VAE, read by the oracle")
    sub.add_parser("curve", help="summarise the runs in --out: fidelity over steps")
    r = sub.add_parser("run", help="train one method on one subject; score every checkpoint")
    r.add_argument("--tag", required=True, help="folder name under --out")
    r.add_argument("--subject", default="pink-cyan-striped-square")
    r.add_argument("--method", default="atoms", choices=("atoms", "lora", "full"))
    r.add_argument("--preset", default=None)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--every", type=int, default=300, help="checkpoint (and score) every N")
    r.add_argument("--captions", choices=("default", "bg", "full"), default="default")
    r.add_argument("--prior-loss-weight", type=float, default=None)
    r.add_argument("--num-class-images", type=int, default=None)
    r.add_argument("--train-token", action="store_true", default=None)
    r.add_argument("--token-lr", type=float, default=None)
    r.add_argument("--token-vectors", type=int, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-n", type=int, default=2, help="images per protocol prompt")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.what == "text":
        probe_text(out)
    elif a.what == "vae":
        probe_vae(out)
    elif a.what == "curve":
        print_curve(out)
    else:
        if a.what == "base":
            names = [s.name for s in subjects.SUBJECTS] if a.subjects == ["all"] else a.subjects
            probe_base(out, a.n, names)
        else:
            probe_run(out, a)


if __name__ == "__main__":
    main()
