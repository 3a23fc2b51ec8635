"""Model specs: built models, folders, hub ids offline, tokenizers, devices and dtypes."""

import json
import time

import pytest
import torch

from sdatom import models
from sdatom.errors import ModelLoadError, UsageError


def _image(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a photo of a sks toy", num_inference_steps=2, generator=g, output_type="np").images


def test_tiny_is_deterministic_and_cached(tiny_dir, monkeypatch):
    a = models.build_pipeline("tiny").unet.state_dict()
    b = models.build_pipeline("tiny").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A second request finds the cached folder and builds nothing.
    monkeypatch.setattr(models, "build_pipeline", lambda *a, **k: pytest.fail("rebuilt"))
    assert models.built_pipeline_dir("tiny") == tiny_dir
    pipe = models.load_pipeline("tiny")
    assert torch.equal(pipe.unet.conv_in.weight, a["conv_in.weight"])


def test_tiny_generates_same_image_for_same_seed(tiny_pipe):
    first, again, other = _image(tiny_pipe, 0), _image(tiny_pipe, 0), _image(tiny_pipe, 1)
    assert first.shape == (1, 64, 64, 3)
    assert (first == again).all()
    assert not (first == other).all()


def test_clip_tokenizer_matches_open_clip():
    import open_clip

    tok = models.clip_tokenizer()
    assert len(tok) == models.CLIP_VOCAB_SIZE
    text = "a photo of a sks dog, in the snow!"
    ids = tok(text, padding="max_length", max_length=77).input_ids
    reference = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    n = reference.index(49407) + 1
    assert ids[:n] == reference[:n]


def test_wrong_vocabulary_size_is_an_error():
    class TwoTokens:
        def __len__(self):
            return 2

    with pytest.raises(ModelLoadError, match="2 tokens but the text encoder expects 49408"):
        models.check_tokenizer(TwoTokens(), 49408, "somewhere")


@pytest.mark.parametrize(
    ("spec", "params", "convs"),
    [
        ("random:sd15", 859_520_964, {"1x1": 46, "3x3": 52}),
        ("random:sd21", 865_910_724, {"1x1": 14, "3x3": 52}),
    ],
)
def test_real_architectures_have_published_sizes(spec, params, convs):
    from sdatom.inspection import unet_inventory

    inv = unet_inventory(models.build_unet(spec, "meta"))
    assert inv["unet_params"] == params
    groups = {g["group"]: g["layers"] for g in inv["groups"]}
    assert groups["Conv2d 1x1"] == convs["1x1"] and groups["Conv2d 3x3"] == convs["3x3"]


def test_sd21_is_v_prediction():
    arch = models.ARCHITECTURES["random:sd21"]
    assert arch.prediction_type == "v_prediction"
    assert arch.unet["use_linear_projection"] is True


def test_local_folder_loads_the_same_weights(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    again = models.load_pipeline(str(tmp_path / "pipe"))
    assert (_image(again) == _image(tiny_pipe)).all()


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        models.load_pipeline(str(tmp_path))


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        ("StableDiffusion3Pipeline", "one patch-embedding convolution"),
        ("FluxPipeline", "no convolutions"),
        ("KandinskyPipeline", "does not support"),
    ],
)
def test_denoisers_without_convolutions_are_refused_with_the_reason(tmp_path, cls, why):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    with pytest.raises(ModelLoadError, match=why):
        models.load_pipeline(str(tmp_path))


def test_hub_id_offline_fails_fast_with_advice():
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"--model PATH .* or --model tiny"):
        models.load_pipeline("sdatom-test/does-not-exist")
    assert time.monotonic() - start < 60  # a generous bound: the failure mode is minutes of retries


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_pipeline(str(tmp_path / "model.safetensors"))


def test_corrupted_checkpoint_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00\x01 this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load checkpoint"):
        models.load_pipeline(str(bad))


def test_unknown_built_spec():
    with pytest.raises(ModelLoadError, match="random:sd15"):
        models.load_pipeline("random:sd99")


def test_default_model_follows_environment(monkeypatch):
    monkeypatch.delenv("SDATOM_MODEL", raising=False)
    assert models.default_model() == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv("SDATOM_MODEL", "tiny")
    assert models.default_model() == "tiny"


def test_dtypes_and_devices():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        models.resolve_dtype("fp16", cpu)
    with pytest.raises(UsageError, match="--dtype 'fp8'"):
        models.resolve_dtype("fp8", cpu)
    if not torch.cuda.is_available():
        assert models.resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(UsageError, match="no CUDA GPU"):
            models.resolve_device("cuda")
    with pytest.raises(UsageError, match="not a device"):
        models.resolve_device("toaster")


def test_bf16_pipeline_has_bf16_unet(tiny_dir):
    pipe = models.load_pipeline(str(tiny_dir), dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16


def test_xformers_falls_back_with_a_reason(tiny_pipe):
    with pytest.warns(UserWarning, match="xformers"):
        assert models.enable_xformers(tiny_pipe, torch.device("cpu")) is False


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "patch-embedding"),
        ("double_blocks.0.img_attn.qkv.weight", "no convolutions"),
    ],
)
def test_sd3_and_flux_single_files_are_refused_with_the_reason(tmp_path, key, why):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match=why):
        models.load_pipeline(str(path))
