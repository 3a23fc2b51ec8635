"""Export: a merged diffusers folder that loads without sdatom, and an LDM single file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_runs import make_atoms_run, make_lora_run, write_config

from sdatom.errors import UsageError
from sdatom.export import export, export_merged, export_single_file, to_ldm_state_dict
from sdatom.runs import load_run_pipeline
from sdatom.sample import generate

PROMPTS = ["a sks dog", "a sks dog on the beach"]
FAST = {"n": 2, "seed": 0, "steps": 2, "guidance": 7.5}
ATOL_FP32 = 1e-4  # float32 images in [0, 1]; rounding-level differences only

# Runs in a fresh interpreter: plain diffusers, the same per-image seeds as sdatom.sample.
FRESH_LOAD = """
import sys, numpy as np, torch
from diffusers import StableDiffusionPipeline
torch.set_num_threads(1)
folder, prompts, out = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
images = []
for prompt in prompts:
    for j in range(2):
        g = [torch.Generator("cpu").manual_seed(j)]
        r = pipe(prompt=[prompt], num_inference_steps=2, guidance_scale=7.5, generator=g,
                 output_type="np")
        images.append(r.images[0])
np.save(out, np.stack(images))
assert "sdatom" not in sys.modules, "the exported pipeline imported sdatom"
print(type(pipe.unet).__module__, type(pipe.unet).__name__)
"""


def _arrays(pipe) -> np.ndarray:
    return np.stack([s.image for s in generate(pipe, PROMPTS, **FAST)])


@pytest.fixture(scope="module")
def atoms_run(tiny_dir, tmp_path_factory):
    return make_atoms_run(tmp_path_factory.mktemp("runs") / "dog", tiny_dir)


@pytest.fixture(scope="module")
def adapted(atoms_run):
    """The run's images through sdatom (merged atoms)."""
    return _arrays(load_run_pipeline(atoms_run))


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_merged_folder_reproduces_the_run_without_sdatom(atoms_run, adapted, tmp_path):
    out = export_merged(atoms_run, tmp_path / "merged")
    assert (out / "model_index.json").is_file()
    assert list((out / "unet").glob("*.safetensors"))
    info = json.loads((out / "sdatom_export.json").read_text())
    assert info["method"] == "atoms" and info["run"] == str(atoms_run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(out), "|".join(PROMPTS), str(tmp_path / "x.npy")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNet2DConditionModel" in result.stdout
    fresh = np.load(tmp_path / "x.npy")
    np.testing.assert_allclose(fresh, adapted, atol=ATOL_FP32, rtol=0)


def test_merged_unet_has_no_adapter_modules(atoms_run, tmp_path):
    from diffusers import UNet2DConditionModel

    out = export_merged(atoms_run, tmp_path / "merged")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not [n for n, m in unet.named_modules() if "sdatom" in type(m).__module__]


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_lora_run_exports_fused_weights(tiny_dir, tmp_path):
    run = make_lora_run(tmp_path / "lora", tiny_dir)
    reference = _arrays(load_run_pipeline(run))
    out = export_merged(run, tmp_path / "merged")
    from sdatom.models import load_pipeline

    np.testing.assert_allclose(_arrays(load_pipeline(str(out))), reference, atol=ATOL_FP32, rtol=0)


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_single_file_round_trip(atoms_run, adapted, tiny_dir, tmp_path):
    from sdatom.models import load_pipeline

    out = export_single_file(atoms_run, tmp_path / "dog.safetensors")
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["method"] == "atoms"
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    pipe = load_pipeline(str(out), config=str(tiny_dir))
    np.testing.assert_allclose(_arrays(pipe), adapted, atol=ATOL_FP32, rtol=0)


def _script_unet_map() -> list[tuple[str, str]]:
    """diffusers' convert_diffusers_to_original_stable_diffusion.py map (SD-1.5 only)."""
    layer = []
    for i in range(4):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layer.append(
                    (f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
                )
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer.append(
                (f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
            )
            layer.append(
                (f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0.")
            )
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return layer


def _script_convert_unet(keys: list[str]) -> set[str]:
    top = {
        "time_embedding.linear_1.weight": "time_embed.0.weight",
        "time_embedding.linear_1.bias": "time_embed.0.bias",
        "time_embedding.linear_2.weight": "time_embed.2.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "conv_in.weight": "input_blocks.0.0.weight",
        "conv_in.bias": "input_blocks.0.0.bias",
        "conv_norm_out.weight": "out.0.weight",
        "conv_norm_out.bias": "out.0.bias",
        "conv_out.weight": "out.2.weight",
        "conv_out.bias": "out.2.bias",
    }
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
              ("skip_connection", "conv_shortcut")]  # fmt: skip
    out = set()
    for k in keys:
        v = top.get(k, k)
        if "resnets" in k:
            for sd_part, hf_part in resnet:
                v = v.replace(hf_part, sd_part)
        for sd_part, hf_part in _script_unet_map():
            v = v.replace(hf_part, sd_part)
        out.add("model.diffusion_model." + v)
    return out


def test_sd15_keys_match_the_original_layout():
    """On the real SD-1.5 architecture (meta tensors, no weights): the reference script's
    UNet names, and known LDM names for the VAE and text encoder."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdatom.models import ARCHITECTURES, build_unet

    arch = ARCHITECTURES["random:sd15"]
    with torch.device("meta"):
        vae = AutoencoderKL(**arch.vae)
        text = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    unet = build_unet("random:sd15", device="meta")
    state = to_ldm_state_dict(SimpleNamespace(unet=unet, vae=vae, text_encoder=text), family="sd")
    unet_keys = {k for k in state if k.startswith("model.diffusion_model.")}
    assert unet_keys == _script_convert_unet(list(unet.state_dict()))
    assert len(unet_keys) == 686
    vae_keys = {k for k in state if k.startswith("first_stage_model.")}
    assert len(vae_keys) == 248
    for key in (
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.encoder.mid.block_2.conv2.weight",
        "first_stage_model.encoder.norm_out.weight",
        "first_stage_model.decoder.up.3.block.2.conv1.weight",
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in state, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["first_stage_model.encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)


def _same_weights(a, b) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_sd2_layout_single_file_reads_back_identical_weights(tmp_path):
    """SD-2.x's OpenCLIP text encoder (fused q/k/v, resblocks, gelu) in its original layout."""
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from sdatom.families import ARCHITECTURES, get_family

    tiny = ARCHITECTURES["tiny"]
    arch = replace(
        tiny,
        text_encoders=({**tiny.text_encoder, "hidden_act": "gelu"},),
        scheduler={**tiny.scheduler, "prediction_type": "v_prediction"},
        pad_tokens=("!",),
    )
    pipe = get_family("sd").build(arch, seed=3)
    pipe.save_pretrained(tmp_path / "sd2", safe_serialization=True)
    state = to_ldm_state_dict(pipe)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sd2.safetensors"))
    back = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "sd2.safetensors"), config=str(tmp_path / "sd2"), local_files_only=True
    )
    for component in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(pipe, component), getattr(back, component)) == [], component


def test_export_refuses_existing_targets_and_bad_options(atoms_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        export_merged(atoms_run, tmp_path / "taken")
    with pytest.raises(UsageError, match="must end in .safetensors"):
        export_single_file(atoms_run, tmp_path / "model.ckpt")
    with pytest.raises(UsageError, match="exactly one of"):
        export(atoms_run)
    with pytest.raises(UsageError, match="exactly one of"):
        export(atoms_run, merged=tmp_path / "a", single_file=tmp_path / "b.safetensors")


def test_unfinished_run_cannot_be_exported(tmp_path):
    write_config(tmp_path / "r", "tiny", "atoms")
    with pytest.raises(UsageError, match="--resume latest"):
        export(tmp_path / "r", merged=tmp_path / "out")


def test_cli_export_single_file(atoms_run, tmp_path):
    from typer.testing import CliRunner

    from sdatom.cli import app

    out = tmp_path / "dog.safetensors"
    result = CliRunner().invoke(app, ["export", "--run", str(atoms_run), "--single-file", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output
    result = CliRunner().invoke(app, ["export", "--run", str(atoms_run)])
    assert result.exit_code == 2 and "exactly one of" in result.output
