"""The shipped ``toy`` model, its defaults, protocol, evaluation backbones and benchmark."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sdatom.toyworld import oracle, subjects, world
from sdatom.toyworld.model import TOY_MODEL_DIR, TRAIN_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = subjects.SUBJECTS[1]
SUBJECT_DIR = ROOT / "data" / "toyworld" / SUBJECT.name


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    # Plain diffusers, offline, from the folder inside the package.
    pipe = StableDiffusionPipeline.from_pretrained(
        TOY_MODEL_DIR, local_files_only=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_loads_in_plain_diffusers_and_draws_the_world(toy_pipe):
    prompts = [
        "a photo of a red circle on the left on a blue background",
        "a photo of a yellow square on the right on a white background",
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = toy_pipe(prompts, generator=gens, num_inference_steps=20, guidance_scale=5.0).images
    for image in images:
        assert image.size == (32, 32)
        px = np.asarray(image, dtype=np.float64)
        border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
        reading = oracle.read(image)
        # Not noise: a flat border (the background) and one compact object on it.
        assert border.std(axis=0).max() < 20
        assert reading.shape is not None and 40 <= reading.area <= 400


def test_sampling_the_toy_without_guidance_uses_its_measured_one(tmp_path):
    from sdatom.models import load_pipeline
    from sdatom.sample import default_guidance, generate
    from sdatom.toyworld.model import SAMPLE_GUIDANCE

    pipe = load_pipeline("toy")
    assert default_guidance(pipe) == SAMPLE_GUIDANCE != 7.5
    prompt = ["a photo of a red circle on a blue background"]

    def draw(guidance):
        return next(generate(pipe, prompt, n=1, steps=4, guidance=guidance)).image

    np.testing.assert_array_equal(draw(None), draw(SAMPLE_GUIDANCE))
    assert not np.array_equal(draw(None), draw(7.5))


def test_the_toy_vae_round_trip_keeps_what_the_oracle_reads(toy_pipe):
    from sdatom.toyworld.quality import to_images, to_tensor, vae_round_trip

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    back = to_images(to_tensor(pixels))
    assert all(np.array_equal(np.asarray(b), p) for b, p in zip(back, pixels, strict=True))
    objs = [world.sample_object(random.Random(i)) for i in range(4)]
    reconstructions, psnrs = vae_round_trip(toy_pipe.vae, [world.draw(o) for o in objs])
    assert len(reconstructions) == len(psnrs) == 4
    # The shipped VAE's report: 35.3 dB on average; a broken round trip (wrong scale, swapped
    # channels) falls to noise-level PSNR and the oracle misreads the colours.
    assert min(psnrs) > 25
    for image, obj in zip(reconstructions, objs, strict=True):
        reading = oracle.read(image)
        assert (reading.background, reading.shape) == (obj.background, obj.shape)


def test_the_shipped_model_is_the_zero_terminal_snr_stage(toy_pipe):
    # pretrain_toy's unet-zsnr stage: v-prediction on SD-1.x's betas rescaled to zero SNR at
    # t = T, sampled from t = T (trailing). An export of the epsilon stage would fail here.
    scheduler = toy_pipe.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    scheduler.set_timesteps(30)
    assert int(scheduler.timesteps[0]) == 999


def test_the_shipped_weights_are_fp16_and_small():
    files = [p for p in TOY_MODEL_DIR.rglob("*.safetensors")]
    assert files
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), "pt") as st:
            assert all(st.get_slice(k).get_dtype() == "F16" for k in st.keys())
    total = sum(p.stat().st_size for p in TOY_MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 25 * 2**20


def test_configs_toy_yaml_is_the_toy_default():
    shipped = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    assert shipped.pop("model") == "toy"
    assert shipped == TRAIN_DEFAULTS


def test_model_toy_brings_its_own_training_defaults(tmp_path):
    from sdatom.config import TrainConfig, build_config

    config = build_config(None, model="toy", subject="s", class_name="square")
    for key, value in TRAIN_DEFAULTS.items():
        assert getattr(config, key) == value
    # The command line wins, then a config file, over the model's defaults.
    assert build_config(None, model="toy", steps=7).steps == 7
    path = tmp_path / "c.yaml"
    path.write_text("model: toy\nsteps: 11\n")
    assert build_config(path).steps == 11 and build_config(path).lr == TRAIN_DEFAULTS["lr"]
    # Other models keep the general defaults.
    assert build_config(None, model="tiny").steps == TrainConfig().steps


def _fake_toy_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = {
        "model": "toy",
        "subject": str(SUBJECT_DIR),
        "class_name": SUBJECT.class_name,
        "token": "sks",
        "method": "atoms",
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_protocol_of_a_toy_run_uses_toy_prompts(tmp_path):
    from sdatom.runs import Run
    from sdatom.sample import resolve_prompts

    run = _fake_toy_run(tmp_path)
    the_run = Run(
        path=run,
        config=yaml.safe_load((run / "config.yaml").read_text()),
        method="atoms",
        adapter=run / "adapter.safetensors",
    )
    prompts = resolve_prompts(protocol=True, run=the_run)
    assert prompts == [p for p, _ in subjects.protocol(SUBJECT)]


def test_toy_backbones_know_the_world():
    from sdatom.eval.metrics import clip_image_embeddings, clip_text_embeddings
    from sdatom.toyworld.backbones import toy_backbones

    b = toy_backbones("cpu")
    assert "toy" in b.names["clip"] and "toy-attrnet" in b.names["dino"]
    import random

    rng = random.Random(9)
    objs = [world.sample_object(rng) for _ in range(24)]
    img = clip_image_embeddings(b, [world.draw(o) for o in objs])
    right = clip_text_embeddings(b, [world.caption(o) for o in objs])
    wrong = clip_text_embeddings(b, [world.caption(o) for o in objs[1:] + objs[:1]])
    # A CLIP that learned the world scores matching captions above mismatched ones.
    assert (img * right).sum(-1).mean() > (img * wrong).sum(-1).mean() + 0.1


@pytest.mark.slow
def test_bench_quality_smoke(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_quality.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{\n") :])
    from safetensors.torch import load_file

    from sdatom.toyworld.model import TRAIN_DEFAULTS

    vectors = TRAIN_DEFAULTS["token_vectors"]  # the toy default trains the token's embedding
    entry = summary["table"][f"atoms + token x{vectors}"]
    (rec,) = entry.values()
    assert rec["n_runs"] == 1 and rec["trainable_params"] > 0
    for key in ("oracle_fidelity", "oracle_alignment", "oracle_drift", "clip_t", "clip_i"):
        assert 0.0 <= rec[key][0] <= 1.0 or key.startswith("clip")
    (cache,) = tmp_path.glob("toy-*")  # one cache folder, named by the toy model's weights
    from sdatom.toyworld.model import SAMPLE_GUIDANCE

    # Scores are cached per guidance (the trained runs are shared): sdatom sample's for the toy.
    assert (cache / f"cfg{SAMPLE_GUIDANCE:g}" / "results").is_dir()
    (run,) = cache.glob(f"runs/*/atoms-token{vectors}v-lr*-s0-st2-n1")  # tagged apart from others
    assert load_file(run / "token_embedding.safetensors")["emb_params"].shape[0] == vectors


def test_eval_of_a_toy_run_adds_the_oracle_and_names_the_toy_backbones(tmp_path):
    import random

    from sdatom.eval.metrics import evaluate
    from sdatom.toyworld.backbones import toy_backbones

    run = tmp_path / "run"
    images = run / "samples" / "protocol"
    images.mkdir(parents=True)
    summary = {"method": "atoms", "model": "toy", "token": "sks", "class_name": SUBJECT.shape}
    (run / "train_summary.json").write_text(json.dumps(summary))
    rng = random.Random(0)
    entries = []
    # A perfect model: the subject exactly where each subject prompt asks, plain class objects.
    for i, (text, role) in enumerate(subjects.protocol(SUBJECT)):
        asked = world.parse_prompt(text)
        looks = (
            {"colors": SUBJECT.colors, "texture": SUBJECT.texture, "position": asked.position}
            if role == "subject"
            else {"texture": "solid"}
        )
        for j in range(2):
            obj = world.sample_object(
                rng, shape=SUBJECT.shape, background=asked.background, allow_held_out=True, **looks
            )
            name = f"p{i:03d}-i{j:02d}.png"
            world.draw(obj).save(images / name)
            entries.append({"file": name, "prompt": text, "seed": j, "prompt_index": i})
    (images / "manifest.json").write_text(json.dumps({"images": entries, "settings": {}}))
    metrics = evaluate(images, SUBJECT_DIR, run / "eval", backbones=toy_backbones(), report=True)
    overall = metrics["overall"]
    assert overall["oracle_fidelity"] == 1.0 and overall["oracle_alignment"] == 1.0
    assert overall["oracle_drift"] == 0.0 and overall["oracle_class_diversity"] > 0.0
    assert "oracle_world" not in overall  # no world prompts were sampled
    assert "toy" in metrics["backbones"]["clip"]
    page = (run / "eval" / "report.html").read_text()
    assert "Oracle fidelity" in page


def test_toy_without_its_weights_is_a_one_line_error(tmp_path, monkeypatch):
    from sdatom.errors import ModelLoadError
    from sdatom.models import load_pipeline
    from sdatom.toyworld import model as toy_model

    monkeypatch.setattr(toy_model, "TOY_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("toy")
    message = str(err.value)
    assert "\n" not in message and "pretrain_toy.py" in message and "--model tiny" in message


def test_bench_captioned_subjects_say_what_each_picture_shows(tmp_path, monkeypatch):
    """bench_quality --captions full: each picture's caption names the position and background
    the oracle reads from that same picture."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_quality
    from PIL import Image

    folder = bench_quality.subject_folder(tmp_path, SUBJECT, "full")
    pictures = sorted(folder.glob("*.png"))
    assert len(pictures) == len(SUBJECT.objects())
    for picture in pictures:
        seen = oracle.read(Image.open(picture).convert("RGB"))
        caption = picture.with_suffix(".txt").read_text().strip()
        assert caption == f"a photo of sks {SUBJECT.shape} on the {seen.position} on a " + (
            f"{seen.background} background"
        )
    assert bench_quality.subject_folder(tmp_path, SUBJECT, "default") == SUBJECT_DIR


def test_bench_quality_lrs_takes_named_grids_or_explicit_rates(monkeypatch):
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_quality

    assert bench_quality._lrs_arg("all") == "all"
    assert bench_quality._lrs_arg("1e-3,3e-3") == (1e-3, 3e-3)
    # One spelling of the toy default is the cached run's: 1e-3 and 0.001 are the same float.
    assert bench_quality._lrs_arg("0.001") == (TRAIN_DEFAULTS["lr"],)
    for bad in ("fast", "1e-3,x", "0", "-1e-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--lrs|learning rates"):
            bench_quality._lrs_arg(bad)


def test_bench_quality_intervals_use_t_beyond_ten_runs(monkeypatch):
    """An eleven-run interval takes t(10) = 2.228 (textbook tables), not the normal's 1.96."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_quality

    for df, table in ((9, 2.262), (10, 2.228), (20, 2.086), (30, 2.042), (120, 1.980)):
        assert bench_quality.t95(df) == pytest.approx(table, abs=2e-3)
    values = [0.0, 1.0] * 5 + [0.5]
    mean, half = bench_quality.interval(values)
    sd = np.std(values, ddof=1)
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(2.228 * sd / np.sqrt(11), rel=1e-3)
