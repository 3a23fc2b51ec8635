"""Run folders: reading them, refusing broken or mismatched ones, loading the adapted pipeline.

The ``make_*_run`` helpers build small finished runs on the tiny model; test_sample.py and
test_export.py import them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sdatom.errors import AdapterError, ConfigError, UsageError
from sdatom.runs import Run, load_run_pipeline, read_run


def write_config(run: Path, model: str, method: str, **extra) -> None:
    """A flat config.yaml like the trainer's."""
    config = {
        "model": model,
        "method": method,
        "preset": "atoms-attn" if method == "atoms" else None,
        "token": "sks",
        "class_name": "dog",
        "subject": "data/dog",
        "resolution": 64,
        "seed": 0,
        "mixed_precision": "no",
        **extra,
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def make_atoms_run(run: Path, tiny_dir: Path, scale: float = 0.1, **extra) -> Path:
    """A finished atoms run whose (random) atoms visibly change the images."""
    from sdatom.atoms import add_atoms, save_atoms, trainable_parameters
    from sdatom.models import load_pipeline

    pipe = load_pipeline(str(tiny_dir))
    add_atoms(pipe.unet, "atoms-attn")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    write_config(run, str(tiny_dir), "atoms", **extra)
    save_atoms(pipe.unet, run / "adapter.safetensors")
    return run


def make_lora_run(run: Path, tiny_dir: Path) -> Path:
    """A finished LoRA run (rank 4 on the attention projections, random non-zero weights)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdatom.models import load_pipeline

    pipe = load_pipeline(str(tiny_dir))
    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    pipe.unet.add_adapter(config)
    state = get_peft_model_state_dict(pipe.unet)  # peft key names, as sdatom train writes
    write_config(run, str(tiny_dir), "lora")
    StableDiffusionPipeline.save_lora_weights(
        str(run), unet_lora_layers=state, weight_name="adapter.safetensors"
    )
    return run


def make_full_run(run: Path, tiny_dir: Path) -> Path:
    """A finished full fine-tune: the tiny UNet with its conv_in weights changed."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_dir) / "unet")
    with torch.no_grad():
        unet.conv_in.weight.add_(0.5)
    write_config(run, str(tiny_dir), "full")
    unet.save_pretrained(run / "unet")
    return run


@pytest.fixture(scope="module")
def atoms_run(tiny_dir, tmp_path_factory):
    return make_atoms_run(tmp_path_factory.mktemp("runs") / "dog", tiny_dir)


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    return make_lora_run(tmp_path_factory.mktemp("runs") / "dog-lora", tiny_dir)


def test_read_run_gives_config_method_and_adapter(atoms_run):
    run = read_run(atoms_run)
    assert isinstance(run, Run)
    assert run.method == "atoms" and run.adapter == atoms_run / "adapter.safetensors"
    assert run.subject_text == "sks dog" and run.name == "dog"


def test_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        read_run(tmp_path / "nope")


def test_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(UsageError, match="not an sdatom run folder"):
        read_run(tmp_path)


def test_unfinished_run_says_resume(tmp_path, tiny_dir):
    write_config(tmp_path / "r", str(tiny_dir), "atoms")
    with pytest.raises(AdapterError, match="--resume latest"):
        read_run(tmp_path / "r")


def test_unknown_method_is_a_config_error(tmp_path, tiny_dir):
    write_config(tmp_path / "r", str(tiny_dir), "dora")
    with pytest.raises(ConfigError, match="method 'dora'"):
        read_run(tmp_path / "r")


def test_lora_file_in_an_atoms_run_is_refused(tmp_path, lora_run):
    run = tmp_path / "r"
    shutil.copytree(lora_run, run)
    write_config(run, "tiny", "atoms")
    with pytest.raises(AdapterError, match="is a LoRA file but config.yaml says method: atoms"):
        read_run(run)


def test_atoms_file_in_a_lora_run_is_refused(tmp_path, atoms_run):
    run = tmp_path / "r"
    shutil.copytree(atoms_run, run)
    write_config(run, "tiny", "lora")
    with pytest.raises(AdapterError, match="is an sdatom atoms file but config.yaml says"):
        read_run(run)


def test_corrupt_adapter_is_refused(tmp_path, tiny_dir):
    write_config(tmp_path / "r", str(tiny_dir), "atoms")
    (tmp_path / "r" / "adapter.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        read_run(tmp_path / "r")


def test_atoms_run_loads_merged_or_live(atoms_run):
    from sdatom.atoms.inject import atom_layers

    merged = load_run_pipeline(atoms_run)
    layers = atom_layers(merged.unet)
    assert layers and all(layer.merged for layer in layers.values())
    live = load_run_pipeline(atoms_run, merge=False)
    assert not any(layer.merged for layer in atom_layers(live.unet).values())


def test_atoms_on_another_base_model_is_refused(atoms_run, tmp_path):
    from sdatom.models import build_pipeline

    other = tmp_path / "other"
    build_pipeline("tiny", seed=7).save_pretrained(other)
    with pytest.raises(AdapterError, match="does not match this base model"):
        load_run_pipeline(atoms_run, model=str(other))


def test_lora_run_is_fused(lora_run, tiny_pipe):
    pipe = load_run_pipeline(lora_run)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    fused = pipe.unet.get_submodule(name)
    base = tiny_pipe.unet.get_submodule(name)
    weight = fused.base_layer.weight if hasattr(fused, "base_layer") else fused.weight
    assert not torch.allclose(weight, base.weight)


def test_full_run_swaps_the_unet(tmp_path, tiny_dir, tiny_pipe):
    run = make_full_run(tmp_path / "full", tiny_dir)
    pipe = load_run_pipeline(run)
    torch.testing.assert_close(pipe.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight + 0.5)
