"""Scoring generated toy-world pictures with the oracle: base-model accuracy and its prompts."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from sdatom.toyworld import oracle, world


def to_tensor(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """RGB pictures as one float batch in [-1, 1], NCHW: what the toy VAE and nets read."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """A batch in [-1, 1], NCHW, as RGB pictures (clamped and rounded): to_tensor's inverse."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def vae_round_trip(vae, images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[float]]:
    """Pictures encoded by ``vae`` (the latent mean) and decoded: the reconstructions, and the
    PSNR of each in dB (on the unrounded decoder output)."""
    x = to_tensor(images)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    psnr = 10 * torch.log10(4.0 / ((rec - x) ** 2).mean((1, 2, 3)))
    return to_images(rec), psnr.tolist()


@torch.no_grad()
def sample_images(
    pipe, prompts: Sequence[str], *, seed: int, steps: int, guidance: float, batch: int = 50
) -> list[Image.Image]:
    """One picture per prompt, the i-th from seed ``seed + i`` (independent of batching)."""
    out: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out += pipe(
            prompt=chunk, generator=gens, num_inference_steps=steps, guidance_scale=guidance
        ).images
    return out


def held_in_prompts(n: int, seed: int) -> list[world.ToyObject]:
    """``n`` held-in objects; their full captions (appearance, position, background) prompt."""
    rng = random.Random(seed)
    return [world.sample_object(rng) for _ in range(n)]


def held_out_solid_objects(n: int, seed: int) -> list[world.ToyObject]:
    """``n`` objects of the held-out (colour, shape) pairs, on random backgrounds."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        color, shape = world.HELD_OUT_SOLID[len(out) % len(world.HELD_OUT_SOLID)]
        bgs = [b for b in world.BACKGROUNDS if b != color]
        out.append(
            world.sample_object(
                rng,
                shape=shape,
                colors=(color,),
                texture="solid",
                background=rng.choice(bgs),
                allow_held_out=True,
            )
        )
    return out


def score(objs: Sequence[world.ToyObject], images: Sequence[Image.Image]) -> dict[str, float]:
    """Oracle accuracy per attribute, and appearance split into solid and two-tone."""
    rows = [oracle.read(im).matches(o) for o, im in zip(objs, images, strict=True)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for tex, name in (("solid", "appearance_solid"), ("two-tone", "appearance_two_tone")):
        sel = [
            r["appearance"]
            for r, o in zip(rows, objs, strict=True)
            if (o.texture == "solid") == (tex == "solid")
        ]
        out[name] = float(np.mean(sel)) if sel else float("nan")
    return out


def base_model_report(
    pipe, *, n: int, seed: int, steps: int, guidance: float, held_out_n: int
) -> dict:
    """The base-model targets of the toy world: held-in accuracy and held-out shape."""
    objs = held_in_prompts(n, seed)
    images = sample_images(
        pipe, [world.caption(o) for o in objs], seed=seed, steps=steps, guidance=guidance
    )
    report = {"held_in": score(objs, images), "n": n, "steps": steps, "guidance": guidance}
    if held_out_n:
        objs = held_out_solid_objects(held_out_n, seed + 1)
        images = sample_images(
            pipe,
            [world.caption(o) for o in objs],
            seed=seed + 10_000,
            steps=steps,
            guidance=guidance,
        )
        report["held_out_pairs"] = score(objs, images)
    return report


def gini_simpson(labels: Sequence[object]) -> float:
    """Probability that two labels drawn at random (with replacement) differ."""
    if not labels:
        return float("nan")
    counts = np.array(list(Counter(labels).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(1.0 - (p * p).sum())


def oracle_metrics(
    subject, prompts: Sequence[str], images: Sequence[Image.Image], token: str
) -> tuple[dict[str, float | None], list[dict]]:
    """Score generated pictures of a toy subject with the oracle.

    Each prompt plays one role: ``subject`` (it names ``token``), ``class`` (the subject's
    class word alone, no appearance: drift), or ``world`` (an ordinary world prompt: world
    knowledge). Returns the overall scores and one record per image.
    """
    rows: list[dict] = []
    for text, image in zip(prompts, images, strict=True):
        asked = world.parse_prompt(text)
        seen = oracle.read(image)
        is_subject = (seen.shape, seen.texture, seen.colors) == (
            subject.shape,
            subject.texture,
            tuple(subject.colors),
        )
        row: dict = {
            "prompt": text,
            "seen": seen.appearance,
            "shape": seen.shape,
            "background": seen.background,
            "position": seen.position,
            "is_subject": is_subject,
        }
        if asked is None:
            row["role"] = None
        elif asked.token == token:
            row["role"] = "subject"
            checks = []
            if asked.background:
                row["aligned_background"] = seen.background == asked.background
                checks.append(row["aligned_background"])
            if asked.position:
                row["aligned_position"] = seen.position == asked.position
                checks.append(row["aligned_position"])
            row["aligned"] = all(checks)
        elif asked.token is None and asked.appearance is None and asked.shape == subject.shape:
            row["role"] = "class"
        elif asked.token is None:
            row["role"] = "world"
            checks = [seen.shape == asked.shape]
            if asked.appearance:
                checks.append(seen.appearance == asked.appearance)
            if asked.background:
                checks.append(seen.background == asked.background)
            if asked.position:
                checks.append(seen.position == asked.position)
            row["correct"] = float(np.mean(checks))
        else:
            row["role"] = None
        rows.append(row)

    def mean(role: str, key: str) -> float | None:
        vals = [float(r[key]) for r in rows if r["role"] == role and key in r]
        return float(np.mean(vals)) if vals else None

    classes = [r["seen"] for r in rows if r["role"] == "class"]
    overall = {
        "oracle_fidelity": mean("subject", "is_subject"),
        "oracle_alignment": mean("subject", "aligned"),
        "oracle_alignment_background": mean("subject", "aligned_background"),
        "oracle_alignment_position": mean("subject", "aligned_position"),
        "oracle_drift": mean("class", "is_subject"),
        "oracle_class_diversity": gini_simpson(classes) if classes else None,
        "oracle_world": mean("world", "correct"),
    }
    return overall, rows
