"""Evaluation metrics on random-weight backbones: properties that hold for any weights."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from sdatom.errors import DataError, UsageError
from sdatom.eval import backbones as bb_module
from sdatom.eval.backbones import load_backbones
from sdatom.eval.metrics import (
    clip_i,
    clip_image_embeddings,
    clip_t,
    dino_embeddings,
    dino_score,
    evaluate,
    format_table,
    lpips_diversity,
    vendi_score,
)

CHROMIUM = Path("/usr/bin/chromium")
MAGENTA = (255, 0, 255)
PROMPTS = ["a sks dog in the snow", "a sks dog on the beach"]


@pytest.fixture(scope="module")
def backbones():
    return load_backbones(random=True)


def _image(seed: int, size: int = 64, color: tuple[int, int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    if color is not None:
        arr = np.empty((size, size, 3), dtype=np.uint8)
        arr[:] = color
    else:
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _write_samples(
    folder: Path, prompts: list[str], per_prompt: int, *, manifest: bool = True, offset: int = 0
) -> Path:
    """A `sdatom sample`-style folder: PNGs with prompt/seed text chunks (+ manifest.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for p, prompt in enumerate(prompts):
        for i in range(per_prompt):
            name = f"p{p:03d}-i{i:02d}.png"
            info = PngImagePlugin.PngInfo()
            info.add_text("prompt", prompt)
            info.add_text("seed", str(i))
            _image(offset + 10 * p + i).save(folder / name, pnginfo=info)
            entries.append({"file": name, "prompt": prompt, "seed": i, "prompt_index": p})
    if manifest:
        settings = {"model": "tiny", "steps": 2, "guidance": 7.5, "scheduler": "ddim"}
        (folder / "manifest.json").write_text(
            json.dumps({"images": entries, "settings": settings | {"adapter": None}})
        )
    return folder


def _write_subject(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _image(100 + i, color=MAGENTA if i == 0 else None).save(folder / f"{i:02d}.jpg")
    return folder


# --------------------------------------------------------------------------- metric properties


def test_image_against_itself_scores_one(backbones):
    img = _image(1)
    assert clip_i(backbones, [img], [img]) == pytest.approx(1.0, abs=1e-5)
    assert dino_score(backbones, [img], [img]) == pytest.approx(1.0, abs=1e-5)


def test_identical_images_have_zero_diversity_and_vendi_one(backbones):
    images = [_image(2)] * 3
    assert lpips_diversity(backbones, images) == pytest.approx(0.0, abs=1e-6)
    assert vendi_score(clip_image_embeddings(backbones, images)) == pytest.approx(1.0, abs=1e-4)
    assert vendi_score(dino_embeddings(backbones, images)) == pytest.approx(1.0, abs=1e-4)


def test_different_images_have_positive_diversity(backbones):
    images = [_image(3), _image(4)]
    assert lpips_diversity(backbones, images) > 0
    assert lpips_diversity(backbones, images[:1]) is None


def test_vendi_of_orthogonal_embeddings_is_n():
    assert vendi_score(torch.eye(5)) == pytest.approx(5.0, abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))  # 4 orthonormal columns
    assert vendi_score(3.0 * q.T) == pytest.approx(4.0, abs=1e-6)
    assert vendi_score(torch.ones(4, 7)) == pytest.approx(1.0, abs=1e-9)


@torch.no_grad()
def test_clip_t_equals_direct_open_clip_with_token_removed(backbones):
    img = _image(5)
    got = clip_t(backbones, [img], "a sks dog in the snow", token="sks")[0]

    def direct(text: str) -> float:
        image = backbones.clip.encode_image(backbones.clip_preprocess(img)[None])
        txt = backbones.clip.encode_text(backbones.clip_tokenizer([text]))
        return float(F.normalize(image, dim=-1) @ F.normalize(txt, dim=-1).T)

    assert got == pytest.approx(direct("a dog in the snow"), abs=1e-5)
    assert got != pytest.approx(direct("a sks dog in the snow"), abs=1e-5)
    assert -1.0 <= got <= 1.0  # a raw cosine, not x100


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_random_backbones_are_deterministic(backbones):
    again = load_backbones(random=True)
    img = _image(6)
    assert torch.equal(clip_image_embeddings(backbones, [img]), clip_image_embeddings(again, [img]))
    assert torch.equal(dino_embeddings(backbones, [img]), dino_embeddings(again, [img]))


# --------------------------------------------------------------------------- loading weights


@pytest.fixture()
def empty_caches(monkeypatch, tmp_path):
    """Offline, with hub/torch/clip caches that hold nothing."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))


def test_offline_without_weights_fails_fast_naming_the_options(empty_caches):
    started = time.perf_counter()
    with pytest.raises(UsageError) as err:
        load_backbones()
    message = str(err.value)
    assert "CLIP weights for ViT-B-32" in message and "not available offline" in message
    assert "--clip-weights" in message and "--dino-weights" in message
    assert "--random-backbones" in message and "\n" not in message
    assert time.perf_counter() - started < 10


def test_cached_hub_checkpoint_is_found_without_network(empty_caches, tmp_path):
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"not really weights")
    cfg = __import__("open_clip").pretrained.get_pretrained_cfg("ViT-B-32", "openai")
    assert bb_module._cached_clip_checkpoint(cfg) == str(weights)
    # Found offline, so the only complaint left is DINO's.
    with pytest.raises(UsageError) as err:
        load_backbones()
    assert "--dino-weights" in str(err.value) and "--clip-weights" not in str(err.value)


def test_missing_weight_files_name_their_option(tmp_path):
    with pytest.raises(UsageError, match="--clip-weights"):
        load_backbones(clip_weights=tmp_path / "nope.bin")
    with pytest.raises(UsageError, match="--clip-model"):
        load_backbones(clip_model="ViT-Nope", random=True)


def test_lpips_is_null_with_reason_without_trunk_weights(empty_caches):
    model, note, _ = bb_module._load_lpips("alex", random=False, device="cpu")
    assert model is None
    assert "alexnet" in note and "torch hub cache" in note


def test_lpips_loads_trunk_from_torch_hub_cache(monkeypatch, tmp_path):
    import torchvision

    torch.manual_seed(7)
    state = torchvision.models.alexnet().state_dict()
    weights = tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth"
    weights.parent.mkdir()
    torch.save(state, weights)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, note, name = bb_module._load_lpips("alex", random=False, device="cpu")
    assert note is None and "random" not in name
    assert torch.equal(model.net.slice1._modules["0"].weight, state["features.0.weight"])
    assert torch.equal(model.net.slice5._modules["10"].bias, state["features.10.bias"])


def test_local_weight_files_are_loaded(monkeypatch, tmp_path):
    """--clip-weights (open_clip checkpoint) and --dino-weights (folder / .safetensors)."""
    import open_clip
    from transformers import ViTConfig, ViTModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    torch.manual_seed(123)
    clip_ref = open_clip.create_model("ViT-S-32-alt")  # small arch: keeps the file small
    clip_file = tmp_path / "clip.pt"
    torch.save({k: v.half() for k, v in clip_ref.state_dict().items()}, clip_file)
    dino_ref = ViTModel(ViTConfig(**bb_module._DINO_VITS16), add_pooling_layer=False)
    dino_ref.save_pretrained(tmp_path / "dino")

    loaded = load_backbones(
        clip_model="ViT-S-32-alt", clip_weights=clip_file, dino_weights=tmp_path / "dino"
    )
    assert loaded.random is False and loaded.names["clip"] == "ViT-S-32-alt (clip.pt)"
    ref = clip_ref.state_dict()["visual.conv1.weight"].half().float()
    assert torch.equal(loaded.clip.state_dict()["visual.conv1.weight"], ref)
    ref_state = dino_ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in loaded.dino.state_dict().items())
    assert loaded.lpips is None and "torch hub cache" in loaded.lpips_note

    bare = tmp_path / "bare" / "dino.safetensors"  # no config.json beside it
    bare.parent.mkdir()
    shutil.copy(tmp_path / "dino" / "model.safetensors", bare)
    dino, name = bb_module._load_dino(bare, random=False, device="cpu")
    assert all(torch.equal(v, ref_state[k]) for k, v in dino.state_dict().items())
    assert name == "DINO ViT-S/16 (dino.safetensors)"
    with pytest.raises(UsageError, match="--clip-weights .* not an open_clip checkpoint") as err:
        load_backbones(clip_model="ViT-S-32-alt", clip_weights=bare, dino_weights=bare)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_metrics_and_report(backbones, tmp_path):
    samples = _write_samples(tmp_path / "run" / "samples", PROMPTS, per_prompt=2)
    subject = _write_subject(tmp_path / "subject")
    out = tmp_path / "run" / "eval"
    metrics = evaluate(samples, subject, out, token="sks", backbones=backbones)

    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["random_backbones"] is True and "RANDOM BACKBONES" in metrics["warning"]
    assert "not x100" in metrics["scales"]["clip_t"]
    assert metrics["inputs"]["n_images"] == 4 and metrics["inputs"]["n_prompts"] == 2
    assert [p["prompt"] for p in metrics["prompts"]] == PROMPTS
    assert metrics["prompts"][0]["text"] == "a dog in the snow"
    overall = metrics["overall"]
    for key in ("clip_t", "clip_i", "dino", "lpips_diversity", "vendi_clip", "vendi_dino"):
        assert isinstance(overall[key], float), key
    assert overall["preserve_clip_i"] is None  # no base images given
    direct = _direct_aggregates(backbones, samples, subject)
    assert overall["clip_t"] == pytest.approx(direct["clip_t"], rel=1e-6)
    assert overall["vendi_clip"] == pytest.approx(direct["vendi_clip"], rel=1e-6)
    assert metrics["settings"]["scheduler"] == "ddim"
    table = format_table(metrics, per_prompt=True)
    assert "RANDOM BACKBONES" in table and "CLIP-T" in table and "a sks dog on the beach" in table


def _direct_aggregates(backbones, samples: Path, subject: Path) -> dict[str, float]:
    """The overall metrics recomputed from the files, image by image, without evaluate():
    similarities are means over images, diversities means over prompts."""
    from sdatom.eval.metrics import clip_text_embeddings, mean_pairwise_cosine

    entries = json.loads((samples / "manifest.json").read_text())["images"]
    images = [Image.open(samples / e["file"]).convert("RGB") for e in entries]
    subj = [Image.open(p).convert("RGB") for p in sorted(subject.iterdir())]
    gen_clip, subj_clip = (
        clip_image_embeddings(backbones, images),
        clip_image_embeddings(backbones, subj),
    )
    gen_dino, subj_dino = dino_embeddings(backbones, images), dino_embeddings(backbones, subj)
    texts = clip_text_embeddings(backbones, [e["prompt"].replace("sks ", "") for e in entries])
    by_prompt: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_prompt.setdefault(e["prompt"], []).append(i)
    n = len(entries)
    return {
        "clip_t": sum(float(gen_clip[i] @ texts[i]) for i in range(n)) / n,
        "clip_i": sum(mean_pairwise_cosine(gen_clip[i : i + 1], subj_clip) for i in range(n)) / n,
        "dino": sum(mean_pairwise_cosine(gen_dino[i : i + 1], subj_dino) for i in range(n)) / n,
        "vendi_clip": float(np.mean([vendi_score(gen_clip[idx]) for idx in by_prompt.values()])),
        "vendi_dino": float(np.mean([vendi_score(gen_dino[idx]) for idx in by_prompt.values()])),
        "lpips_diversity": float(
            np.mean(
                [lpips_diversity(backbones, [images[i] for i in idx]) for idx in by_prompt.values()]
            )  # fmt: skip
        ),
    }


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_evaluate_aggregates_equal_a_direct_computation(backbones, tmp_path):
    prompts = [*PROMPTS, "a sks dog in a bucket"]
    samples = _write_samples(tmp_path / "samples", prompts, per_prompt=3)
    subject = _write_subject(tmp_path / "subject", n=3)
    metrics = evaluate(samples, subject, tmp_path / "eval", token="sks", backbones=backbones)
    direct = _direct_aggregates(backbones, samples, subject)
    for key, value in direct.items():
        assert metrics["overall"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # and the aggregates are not all alike: a wrong grouping or averaging would show
    assert len({round(v, 6) for v in direct.values()}) == len(direct)


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_evaluate_shows_a_progress_bar_on_a_terminal(backbones, tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    samples = _write_samples(tmp_path / "samples", PROMPTS, per_prompt=2)
    subject = _write_subject(tmp_path / "subject")
    for progress, shown in ((True, True), (False, False)):
        err = Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        evaluate(samples, subject, tmp_path / "eval", backbones=backbones, report=False,
                 progress=progress)  # fmt: skip
        assert ("eval:" in err.getvalue() and "/5 [" in err.getvalue()) == shown, err.getvalue()


def test_report_images_resolve_and_banner_shows(backbones, tmp_path):
    samples = _write_samples(tmp_path / "samples", PROMPTS, per_prompt=2)
    out = tmp_path / "eval"
    evaluate(samples, _write_subject(tmp_path / "subject"), out, backbones=backbones)
    page = (out / "report.html").read_text()
    assert "RANDOM BACKBONES — these numbers mean nothing about quality" in page
    sources = _img_sources(page)
    assert len(sources) == 1 + 2 + 4  # plot, subject photos, samples
    for src in sources:
        assert src.startswith("data:") or (out / src).is_file(), src


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_same_seed_base_images_give_preservation(backbones, tmp_path):
    samples = _write_samples(tmp_path / "samples", PROMPTS, per_prompt=2)
    base = _write_samples(tmp_path / "base", [p.replace("sks ", "") for p in PROMPTS], 1)
    metrics = evaluate(
        samples,
        _write_subject(tmp_path / "subject"),
        tmp_path / "eval",
        base_images_dir=base,
        backbones=backbones,
        report=False,
    )
    # seed 0 of each prompt is paired; the base image is the adapted one (same pixels).
    paired = [im for im in metrics["images"] if "preserve_clip_i" in im]
    assert len(paired) == 2 and metrics["inputs"]["n_base_pairs"] == 2
    assert metrics["overall"]["preserve_clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["overall"]["preserve_dino"] == pytest.approx(1.0, abs=1e-5)
    assert "preservation" in metrics["notes"]


def test_lpips_without_weights_is_null_not_a_crash(backbones, tmp_path):
    no_lpips = dataclasses.replace(backbones, lpips=None, lpips_note="no alexnet weights")
    samples = _write_samples(tmp_path / "samples", PROMPTS[:1], per_prompt=2)
    metrics = evaluate(
        samples, _write_subject(tmp_path / "subject"), tmp_path / "eval", backbones=no_lpips
    )
    assert metrics["overall"]["lpips_diversity"] is None
    assert metrics["notes"]["lpips_diversity"] == "no alexnet weights"
    assert metrics["overall"]["vendi_clip"] is not None


def test_folder_without_manifest_uses_png_prompt_chunks(backbones, tmp_path):
    samples = _write_samples(tmp_path / "samples", PROMPTS, per_prompt=1, manifest=False)
    _image(9).save(samples / "grid.png")  # `sdatom sample` writes one, without a prompt chunk
    metrics = evaluate(
        samples,
        _write_subject(tmp_path / "subject"),
        tmp_path / "eval",
        backbones=backbones,
        report=False,
    )
    assert sorted(p["prompt"] for p in metrics["prompts"]) == sorted(PROMPTS)
    assert metrics["inputs"]["n_images"] == 2
    assert metrics["overall"]["lpips_diversity"] is None  # one image per prompt


def test_folder_without_prompts_is_a_usage_error(backbones, tmp_path):
    (tmp_path / "samples").mkdir()
    _image(0).save(tmp_path / "samples" / "x.png")  # no text chunk, no manifest
    with pytest.raises(UsageError, match="prompt"):
        evaluate(
            tmp_path / "samples",
            _write_subject(tmp_path / "s"),
            tmp_path / "e",
            backbones=backbones,
        )
    with pytest.raises(UsageError, match="--images"):
        evaluate(tmp_path / "missing", tmp_path / "s", tmp_path / "e", backbones=backbones)


def test_manifest_listing_a_missing_file_is_a_data_error(backbones, tmp_path):
    samples = _write_samples(tmp_path / "samples", PROMPTS, per_prompt=1)
    (samples / "p001-i00.png").unlink()
    with pytest.raises(DataError, match="p001-i00.png"):
        evaluate(samples, _write_subject(tmp_path / "s"), tmp_path / "e", backbones=backbones)


# --------------------------------------------------------------------------- report in a browser


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def _img_sources(page: str) -> list[str]:
    parser = _Images()
    parser.feed(page)
    return parser.sources


# Injected into a copy of the page: records which <img> failed to load once the page has.
_IMG_CHECK = """<script>window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0)
    .map(i => i.getAttribute('src'));
  document.body.setAttribute('data-imgcheck', JSON.stringify({n: document.images.length, bad}));
});</script>"""


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1200,1600", "--enable-logging=stderr", "--v=0", *extra, url,
        ],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(backbones, tmp_path):
    samples = _write_samples(tmp_path / "samples", PROMPTS, per_prompt=2)
    out = tmp_path / "eval"
    evaluate(samples, _write_subject(tmp_path / "subject"), out, backbones=backbones)
    page = out / "report.html"

    shot = tmp_path / "shot.png"
    result = _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}")
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20, "screenshot is blank"
    red_banner = (pixels[..., 0] > 170) & (pixels[..., 1] < 40) & (pixels[..., 2] < 40)
    assert red_banner.sum() > 10_000, "no red random-backbones banner on screen"
    magenta = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] > 200)
    assert magenta.sum() > 2_000, "the (magenta) subject photo is not shown"

    # Every image must load: a copy of the page beside it reports failures into the DOM.
    probe = out / "_imgcheck.html"
    probe.write_text(page.read_text().replace("</body>", _IMG_CHECK + "</body>"))
    result = _chromium(tmp_path, probe.as_uri(), "--dump-dom")
    found = re.search(r'data-imgcheck="([^"]*)"', result.stdout)
    assert found, result.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check == {"n": 7, "bad": []}
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    probe.unlink()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
