"""SDXL: the published architecture, the tiny offline pipeline, its conditioning (two text
encoders, pooled embedding, size ids per row), and the train → sample → export round trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdatom.cli import app
from sdatom.config import TrainConfig
from sdatom.data import DreamBoothDataset, Encoders, collate_dreambooth, prepare_image

runner = CliRunner()
SUBJECT = os.path.join(os.path.dirname(__file__), "..", "data", "toy")
ATOL_FP32 = 1e-4  # float32 images in [0, 1]: rounding-level differences only


@pytest.fixture(scope="module")
def xl_dir(sdatom_cache):
    from sdatom.models import built_pipeline_dir

    return built_pipeline_dir("tiny-sdxl")


@pytest.fixture
def xl_pipe(xl_dir):
    from sdatom.models import load_pipeline

    return load_pipeline(str(xl_dir))


def test_random_sdxl_has_the_published_size():
    result = runner.invoke(app, ["inspect", "--model", "random:sdxl", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["unet_params"] == 2_567_463_684
    groups = {g["group"]: g["layers"] for g in report["groups"]}
    assert groups["Conv2d 3x3"] == 40 and groups["Conv2d 1x1"] == 11
    assert groups["Linear: attention q/k/v/out"] == 560


@pytest.mark.parametrize("preset", ["atoms", "atoms-attn"])
def test_presets_apply_to_sdxl_unchanged(preset):
    """The counting rule: with the same preset, SDXL's count follows from its layers."""
    result = runner.invoke(app, ["inspect", "--model", "random:sdxl", "--preset", preset, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    convs = next(g for g in report["trainable_groups"] if g["group"] == "Conv2d 3x3")
    assert convs["layers"] == 40 and convs["trainable"] > 0
    assert sum(g["trainable"] for g in report["trainable_groups"]) == report["trainable_params"]


def test_tiny_sdxl_is_an_sdxl_pipeline_with_two_different_text_encoders(xl_pipe):
    from sdatom.families import family_of

    assert type(xl_pipe).__name__ == "StableDiffusionXLPipeline"
    assert family_of(xl_pipe).name == "sdxl"
    one, two = xl_pipe.text_encoder.config, xl_pipe.text_encoder_2.config
    assert one.hidden_size != two.hidden_size
    assert one.hidden_size + two.hidden_size == xl_pipe.unet.config.cross_attention_dim
    assert type(xl_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert xl_pipe.tokenizer_2.pad_token == "!" and xl_pipe.tokenizer.pad_token == "<|endoftext|>"
    assert one.eos_token_id == two.eos_token_id == 2  # as the published configs have it
    assert xl_pipe.vae.config.scaling_factor == 0.13025
    assert len(xl_pipe.vae.config.block_out_channels) == 4


def test_sampling_without_guidance_takes_diffusers_sdxl_default(xl_pipe, tmp_path):
    # SDXL's pipeline samples at guidance 5 by default, not SD-1.x's 7.5: so does sdatom sample.
    from sdatom.sample import default_guidance, sample

    assert default_guidance(xl_pipe) == 5.0
    sample(xl_pipe, ["a dog"], n=1, steps=2, output_dir=tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["guidance"] == 5.0


def test_conditioning_matches_diffusers_encode_prompt(xl_pipe):
    from sdatom.families import family_of

    prompts = ["a photo of sks dog", "a dog"]
    cond = family_of(xl_pipe).encode_prompts(xl_pipe, prompts, torch.device("cpu"))
    embeds, _, pooled, _ = xl_pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond.hidden, embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond.pooled, pooled, atol=0, rtol=0)


def test_time_ids_follow_the_crop_actually_taken():
    img = Image.new("RGB", (96, 64), (200, 10, 10))  # wider than tall: crops move along x
    _, (top, left) = prepare_image(img, 32, center_crop=True, return_crop=True)
    assert (top, left) == (0, 8)  # resized to 48x32, centre crop
    _, (top, left) = prepare_image(img, 32, center_crop=True, flip=True, return_crop=True)
    assert (top, left) == (0, 48 - 8 - 32)  # the same crop, seen in the mirrored picture


def _write(path, size, colour):
    Image.new("RGB", size, colour).save(path)
    return path


def test_prior_rows_carry_their_own_embeddings_and_size_ids(xl_pipe, tmp_path):
    """Each instance and class row gets its own prompt embedding and size ids (diffusers'
    SDXL DreamBooth script interleaves them with prior preservation and batch > 1)."""
    from sdatom.families import family_of

    inst = tmp_path / "inst"
    cls = tmp_path / "cls"
    inst.mkdir(), cls.mkdir()
    _write(inst / "a.png", (80, 64), (250, 0, 0))
    _write(inst / "b.png", (64, 96), (0, 250, 0))
    _write(cls / "c.png", (64, 64), (0, 0, 250))
    _write(cls / "d.png", (128, 64), (9, 9, 9))
    (inst / "b.txt").write_text("a photo of sks dog on a beach")
    data = DreamBoothDataset(
        inst, token="sks", class_name="dog", resolution=32, class_images=cls, seed=1
    )
    batch = collate_dreambooth([data[0], data[1]], with_prior=True)
    assert batch["prompts"] == [
        "a photo of sks dog",
        "a photo of sks dog on a beach",
        "a photo of dog",
        "a photo of dog",
    ]
    enc = Encoders(xl_pipe, torch.device("cpu"), cache=False)
    kwargs = enc.unet_kwargs(batch["prompts"], batch["sizes"], 32)
    ids = kwargs["added_cond_kwargs"]["time_ids"]
    # (original h, w) of each row's own picture, its crop corner, then the target size
    assert ids.tolist() == [
        [64, 80, 0, 4, 32, 32],
        [96, 64, 8, 0, 32, 32],
        [64, 64, 0, 0, 32, 32],
        [64, 128, 0, 16, 32, 32],
    ]
    family = family_of(xl_pipe)
    for row, prompt in enumerate(batch["prompts"]):
        alone = family.encode_prompts(xl_pipe, [prompt], torch.device("cpu"))
        torch.testing.assert_close(kwargs["encoder_hidden_states"][row], alone.hidden[0])
        torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"][row], alone.pooled[0])


def _config(tmp_path, xl_dir, name, **kw):
    base = dict(
        subject=SUBJECT,
        class_name="toy",
        model=str(xl_dir),
        resolution=64,
        steps=3,
        prior=True,
        num_class_images=2,
        class_sample_steps=2,
        lr=1e-2,
        report_to="none",
        checkpoint_every=0,
        output=str(tmp_path / name),
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["atoms", "lora", "full"])
def test_every_method_trains_on_sdxl(tmp_path, xl_dir, method):
    from sdatom.train import train

    result = train(_config(tmp_path, xl_dir, method, method=method), progress_bar=False)
    assert result.steps == 3 and result.adapter.exists()
    assert np.isfinite(result.final_loss)


def test_sdxl_gradient_checkpointing_gives_the_same_adapter(tmp_path, xl_dir):
    from safetensors.torch import load_file

    from sdatom.train import train

    plain = train(_config(tmp_path, xl_dir, "plain", prior=False, lr=1e-3), progress_bar=False)
    ckpt = train(
        _config(tmp_path, xl_dir, "ckpt", prior=False, lr=1e-3, gradient_checkpointing=True),
        progress_bar=False,
    )
    a, b = load_file(str(plain.adapter)), load_file(str(ckpt.adapter))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_sdxl_bf16_keeps_atoms_fp32_and_the_vae_in_fp32(tmp_path, xl_dir):
    from sdatom.atoms import trainable_parameters
    from sdatom.families import get_family
    from sdatom.train import train

    result = train(
        _config(tmp_path, xl_dir, "bf16", prior=False, mixed_precision="bf16"), progress_bar=False
    )
    assert all(p.dtype == torch.float32 for p in trainable_parameters(result.unet))
    assert result.unet.conv_in.base_layer.weight.dtype == torch.bfloat16
    assert np.isfinite(result.final_loss)
    # SDXL's own VAE overflows in fp16: it stays fp32 unless an fp16-safe --vae is given.
    family, vae = get_family("sdxl"), type("P", (), {})()
    vae.vae = type("V", (), {"config": {"force_upcast": True}})()
    assert family.vae_dtype(vae, torch.float16, custom_vae=False) == torch.float32
    assert family.vae_dtype(vae, torch.float16, custom_vae=True) == torch.float16


def _images(pipe, seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        "a photo of sks toy",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=g,
        output_type="np",
    )
    return out.images


@pytest.mark.slow  # the whole chain through the CLI: make test, not test-fast
def test_train_sample_eval_export_round_trip_through_the_cli(tmp_path, xl_dir):
    from diffusers import StableDiffusionXLPipeline

    from sdatom.runs import load_run_pipeline

    run = tmp_path / "run"
    args = ["train", "--model", str(xl_dir), "--subject", SUBJECT, "--class-name", "toy"]
    args += ["--steps", "3", "--resolution", "64", "--num-class-images", "2", "--lr", "1e-2"]
    result = runner.invoke(app, [*args, "--output", str(run)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["sample", "--run", str(run), "--prompt", "a sks toy", "-n", "2", "--steps", "2",
              "--height", "64", "--width", "64", "--quiet"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--run", str(run), "--random-backbones", "--quiet"])
    assert result.exit_code == 0, result.output
    adapted = _images(load_run_pipeline(run))
    base = _images(StableDiffusionXLPipeline.from_pretrained(str(xl_dir)))
    assert np.abs(adapted - base).max() > 1e-3  # the adapter changes the pictures

    result = runner.invoke(app, ["export", "--run", str(run), "--merged", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "m"), local_files_only=True)
    np.testing.assert_allclose(_images(merged), adapted, atol=ATOL_FP32, rtol=0)

    single = tmp_path / "run.safetensors"
    result = runner.invoke(app, ["export", "--run", str(run), "--single-file", str(single)])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        prefixes = {".".join(k.split(".")[:3]) for k in f.keys() if k.startswith("conditioner")}
    assert prefixes == {"conditioner.embedders.0", "conditioner.embedders.1"}
    back = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(tmp_path / "m"), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(merged, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    np.testing.assert_allclose(_images(back), adapted, atol=ATOL_FP32, rtol=0)
    # sdatom reads its own single file back as SDXL (--model FILE --model-config FOLDER)
    from sdatom.models import load_pipeline

    again = load_pipeline(str(single), config=str(tmp_path / "m"))
    assert type(again).__name__ == "StableDiffusionXLPipeline"
    np.testing.assert_allclose(_images(again), adapted, atol=ATOL_FP32, rtol=0)


@pytest.mark.slow
def test_sdxl_resume_equals_uninterrupted(tmp_path, xl_dir):
    import shutil

    from safetensors.torch import load_file

    from sdatom.train import train

    common = dict(steps=4, checkpoint_every=2, keep_checkpoints=5, hflip=0.5, center_crop=False)
    whole = train(_config(tmp_path, xl_dir, "whole", **common), progress_bar=False)
    cut = train(_config(tmp_path, xl_dir, "cut", **common), progress_bar=False)
    for name in ("adapter.safetensors", "train_summary.json"):
        (cut.output / name).unlink()
    shutil.rmtree(cut.output / "checkpoints" / "step-000004")
    resumed = train(_config(tmp_path, xl_dir, "cut", **common), resume="latest", progress_bar=False)
    a, b = load_file(str(whole.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def _two_process_worker(cfg_dict):
    from accelerate import PartialState

    from sdatom.train import train

    PartialState._reset_state()  # forked from a process that already ran single-process runs
    train(TrainConfig.from_dict(cfg_dict), progress_bar=False)


@pytest.mark.slow
def test_sdxl_two_processes_match_one_process_with_twice_the_batch(tmp_path, xl_dir):
    from accelerate import debug_launcher
    from safetensors.torch import load_file

    from sdatom.train import train

    common = dict(steps=2, lr=1e-3, prior=False)
    one = train(_config(tmp_path, xl_dir, "one", batch_size=2, **common), progress_bar=False)
    two = _config(tmp_path, xl_dir, "two", batch_size=1, **common).to_dict()
    debug_launcher(_two_process_worker, args=(two,), num_processes=2)
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2
    a, b = load_file(str(one.adapter)), load_file(str(tmp_path / "two" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    # Averaging over two processes sums in another order than one batch of two: fp32 noise in
    # the gradient. Adam divides by the gradient's size, so where an element's gradient is
    # itself at noise level the noise can move it by up to 2 * lr per step (a sign flip). Every
    # element stays within that bound, and all but a few (<= 1 %) agree to 1e-5: a run whose
    # processes did not average would differ in most elements.
    bound = 2 * common["lr"] * common["steps"]
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        assert diff.max() <= bound, (k, diff.max())
        assert (diff > 1e-5).float().mean() <= 0.01, (k, (diff > 1e-5).sum(), diff.numel())
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "d0" not in k)


def test_vae_option_replaces_the_vae_and_bad_paths_fail_in_one_line(xl_dir, tiny_dir, tmp_path):
    from sdatom.errors import ModelLoadError
    from sdatom.models import load_pipeline

    # Another VAE of the same latent layout: the tiny SD model's, saved as a VAE folder.
    other = load_pipeline(str(tiny_dir)).vae
    other.save_pretrained(tmp_path / "vae")
    pipe = load_pipeline(str(xl_dir), vae=str(tmp_path / "vae"))
    assert pipe.vae.config.block_out_channels == other.config.block_out_channels
    mine, theirs = pipe.vae.state_dict(), other.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with pytest.raises(ModelLoadError, match=r"^--vae .*nothing: cannot load a VAE"):
        load_pipeline(str(xl_dir), vae=str(tmp_path / "nothing"))
