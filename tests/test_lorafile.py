"""Small files for other tools (sdatom export --lora / --diff), checked by their real consumers:
diffusers' load_lora_weights, lycoris-lora's loader and merge, and the key rules of kohya,
diffusers' converter and ComfyUI."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_runs import make_atoms_run, make_full_run, make_lora_run, write_config

import sdatom
from sdatom.errors import UsageError
from sdatom.lorafile import export_diff, export_lora
from sdatom.methods import get_method
from sdatom.models import load_pipeline
from sdatom.runs import load_run_pipeline, read_run
from sdatom.sample import generate

# fp16 stores each number to a relative 2^-11 (round to nearest): a stored ΔW is within
# 2^-11 of ΔW in Frobenius norm, an up·down product of two rounded factors within about
# 2·2^-11 (plus the fp32 sums). Relative to the layer's update, not to W.
FP16_DIFF = 2**-11
FP16_PAIR = 2 * 2**-11 + 1e-5
FAST = {"n": 2, "seed": 0, "steps": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def atoms_run(tiny_dir, runs):
    return make_atoms_run(runs / "dog", tiny_dir)


@pytest.fixture(scope="module")
def reference(atoms_run):
    """The atoms-merged UNet weights and the base weights."""
    pipe = load_run_pipeline(atoms_run)
    get_method("atoms").unwrap(pipe)
    base = load_pipeline(read_run(atoms_run).model).unet.state_dict()
    return pipe.unet.state_dict(), base


@pytest.fixture(scope="module")
def full_rank(atoms_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "full-rank.safetensors"
    return export_lora(atoms_run, out, rank=10**6, dense="lora", samples=0)


def _relative_errors(got, want, base) -> dict[str, float]:
    """Per changed weight: ‖got − want‖/‖want − base‖; unchanged weights must be identical."""
    out = {}
    for key, w in want.items():
        update = (w - base[key]).norm()
        if update > 0:
            out[key] = float((got[key] - w).norm() / update)
        else:
            assert torch.equal(got[key], w), f"{key} changed but the adapter does not touch it"
    return out


def _load_in_diffusers(pipe, path: Path, caplog):
    """load_lora_weights with every warning and diffusers/peft log record caught."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    records = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [str(w.message) for w in caught] + records


def _lora_modules(unet) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


# ----------------------------------------------------------------------------- diffusers


def test_full_rank_file_loads_in_diffusers_and_reproduces_the_atoms(
    full_rank, atoms_run, reference, caplog
):
    merged, base = reference
    pipe = load_pipeline(read_run(atoms_run).model)
    assert _load_in_diffusers(pipe, full_rank.path, caplog) == []
    assert _lora_modules(pipe.unet) == {r.module for r in full_rank.layers}  # no key left over
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    errors = _relative_errors(pipe.unet.state_dict(), merged, base)
    assert len(errors) == len(full_rank.layers) == 65
    assert max(errors.values()) <= FP16_PAIR, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.slow  # ~20 s: two exact-vs-file sampling passes
def test_report_matches_what_diffusers_computes(atoms_run, tmp_path, caplog):
    """At a coarse --max-error: the reported layer errors hold, and the reported image
    difference is the one diffusers' own loading of the file gives."""
    report = export_lora(
        atoms_run, tmp_path / "a.safetensors", max_error=0.3, dense="lora", samples=2,
        sample_steps=2,
    )  # fmt: skip
    assert all(r.rank is not None for r in report.layers)
    assert report.worst.error <= 0.3 + FP16_PAIR
    assert min(r.rank for r in report.layers) < max(r.rank for r in report.layers)
    exact = load_run_pipeline(atoms_run, merge=False)
    pipe = load_pipeline(read_run(atoms_run).model)
    assert _load_in_diffusers(pipe, report.path, caplog) == []
    prompts = ["a photo of sks dog"]
    want = np.stack([s.image for s in generate(exact, prompts, **FAST)])
    got = np.stack([s.image for s in generate(pipe, prompts, **FAST)])
    diff = np.abs(want.astype(np.float64) - got)
    assert diff.mean() > 1e-4  # a 30 % approximation must show
    # our estimate (base + the file's update, fp32) vs diffusers' peft layers: fp32 rounding
    assert report.image_diff["mean_abs"] == pytest.approx(diff.mean(), rel=1e-2, abs=1e-6)


def test_default_error_images_are_close_to_the_exact_adapter(atoms_run, tmp_path):
    """Default --max-error 0.01: within 1e-3 mean / 1e-2 max pixel difference on [0, 1]
    (tiny, 2 steps: the file's error is fp16 rounding plus at most 1 % per layer)."""
    report = export_lora(atoms_run, tmp_path / "d.safetensors", sample_steps=2)
    assert report.worst.error <= 0.01 + FP16_PAIR
    assert report.image_diff["images"] == 2
    assert report.image_diff["mean_abs"] <= 1e-3 and report.image_diff["max_abs"] <= 1e-2


@pytest.mark.slow  # ~20 s: builds tiny-sdxl
def test_sdxl_file_uses_ldm_names_and_loads_in_diffusers(tmp_path, caplog):
    from sdatom.models import built_pipeline_dir

    xl = built_pipeline_dir("tiny-sdxl")
    run = make_atoms_run(tmp_path / "xl", xl)
    report = export_lora(run, tmp_path / "xl.safetensors", rank=10**6, dense="lora", samples=0)
    keys = {r.key for r in report.layers}
    assert "lora_unet_input_blocks_0_0" in keys and "lora_unet_out_2" in keys  # conv_in/out
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    meta = safe_open(str(report.path), "pt").metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    pipe = load_pipeline(str(xl))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert _load_in_diffusers(pipe, report.path, caplog) == []
    assert _lora_modules(pipe.unet) == {r.module for r in report.layers}
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ref = load_run_pipeline(run)
    get_method("atoms").unwrap(ref)
    errors = _relative_errors(pipe.unet.state_dict(), ref.unet.state_dict(), base)
    assert max(errors.values()) <= FP16_PAIR


def test_dense_layers_become_diffs_or_an_error(atoms_run, tmp_path):
    """tiny's random layers need almost full rank for 1 %: the default stores them dense."""
    report = export_lora(atoms_run, tmp_path / "d.safetensors", samples=0)
    keys = load_file(str(report.path))
    assert report.dense and any(k.endswith(".diff") for k in keys)
    assert len(report.dense) == len(report.layers)
    assert any("diffusers' load_lora_weights does not" in n for n in report.notes)
    assert report.worst.error <= FP16_DIFF
    with pytest.raises(UsageError, match=r"--lora: .* needs rank .*--max-error"):
        export_lora(atoms_run, tmp_path / "e.safetensors", dense="error", samples=0)
    assert not (tmp_path / "e.safetensors").exists()


# ----------------------------------------------------------------------------- lycoris


def _lycoris_merge(unet, path: Path):
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    before = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})  # kohya's unet prefix
    try:
        network, weights = create_lycoris_from_weights(1.0, str(path), unet)
    finally:
        LycorisNetwork.LORA_PREFIX = before
    network.merge_to(1.0)
    return network, weights


@pytest.mark.parametrize("kind", ["diff", "locon", "locon+diff"])
def test_lycoris_loads_and_merges_to_the_atoms(kind, atoms_run, reference, full_rank, tmp_path):
    merged, base = reference
    if kind == "diff":
        report = export_diff(atoms_run, tmp_path / "x.safetensors", samples=0)
    elif kind == "locon":
        report = full_rank
    else:  # the default: every tiny layer falls back to a diff
        report = export_lora(atoms_run, tmp_path / "x.safetensors", samples=0)
    unet = load_pipeline(read_run(atoms_run).model).unet
    network, weights = _lycoris_merge(unet, report.path)
    assert len(network.loras) == len(report.layers)
    got = unet.state_dict()
    errors = _relative_errors(got, merged, base)
    if kind == "locon":
        reported = {f"{r.module}.weight": r.error for r in report.layers}
        for key, err in errors.items():
            assert err <= reported[key] * (1 + 1e-3) + 1e-6, key
    else:  # exact up to fp16: the merge adds the stored diff itself
        assert max(errors.values()) <= FP16_DIFF
        for r in report.layers:
            stored = weights[f"{r.key}.diff"].float()
            key = f"{r.module}.weight"
            torch.testing.assert_close(got[key], base[key] + stored, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- key names


def _adapted_layers(unet) -> list[str]:
    """Every layer some method adapts: the atoms presets' targets and, for full runs, every
    Conv2d/Linear (a superset of LoRA's attention projections)."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]


def _ldm_module_names(unet) -> dict[str, str]:
    """diffusers module -> original (LDM) module, from the single-file layout test_export.py
    checks against the original conversion script."""
    from sdatom.families.ldm import unet_to_ldm

    prefix = "model.diffusion_model."
    keys = list(unet.state_dict())
    ldm = list(unet_to_ldm(unet))  # same order: one output key per input key
    return {
        k[: -len(".weight")]: v[len(prefix) : -len(".weight")]
        for k, v in zip(keys, ldm, strict=True)
        if k.endswith(".weight")
    }


def _comfyui_accepts(unet) -> set[str]:
    """The UNet LoRA names ComfyUI loads, written from its rule (ComfyUI comfy/lora.py,
    ``model_lora_keys_unet``): ``lora_unet_`` + each ``diffusion_model.*`` weight's LDM
    path with ``.`` -> ``_``, and ``lora_unet_`` + each diffusers weight path of its
    ``unet_to_diffusers`` map with ``.`` -> ``_``."""
    names = _ldm_module_names(unet)
    return {"lora_unet_" + p.replace(".", "_") for p in (*names.keys(), *names.values())}


@pytest.mark.parametrize("spec", ["random:sd15", "random:sd21", "random:sdxl"])
def test_every_adapted_layer_maps_back_under_kohya_diffusers_and_comfyui(spec):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    from sdatom.atoms import find_targets
    from sdatom.families import ARCHITECTURES, get_family
    from sdatom.models import build_unet

    unet = build_unet(spec, device="meta")
    family = get_family(ARCHITECTURES[spec].family)
    layers = _adapted_layers(unet)
    for preset in sdatom.PRESETS:
        assert set(find_targets(unet, preset)) <= set(layers)
    names = {layer: family.kohya_unet_name(layer, unet.config) for layer in layers}
    assert len(set(names.values())) == len(names)

    # kohya: SD-1.x/2.x name the diffusers module, SDXL the original (LDM) module.
    ldm = _ldm_module_names(unet)
    for layer, key in names.items():
        path = ldm[layer] if family.name == "sdxl" else layer
        assert key == "lora_unet_" + path.replace(".", "_")

    # diffusers' converter, one layer at a time: the peft name it gives is the module itself.
    one = torch.zeros(1, 1)
    for layer, key in names.items():
        sd = {
            f"{key}.lora_down.weight": one,
            f"{key}.lora_up.weight": one,
            f"{key}.alpha": one[0, 0],
        }
        converted, _ = StableDiffusionPipeline.lora_state_dict(dict(sd), unet_config=unet.config)
        peft = convert_unet_state_dict_to_peft(
            {k.removeprefix("unet."): v for k, v in converted.items()}
        )
        assert sorted(peft) == [f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"], key

    # ComfyUI: every name is one it maps (lists the ones it would not load).
    missing = sorted(set(names.values()) - _comfyui_accepts(unet))
    assert missing == []


# ----------------------------------------------------------------------------- other methods


def test_lora_run_exports_peft_weights_exactly(tiny_dir, runs, tmp_path):
    from peft.tuners.lora import LoraLayer

    run = make_lora_run(runs / "lora", tiny_dir)  # the old file name: still read
    assert read_run(run).adapter.name == "adapter.safetensors"
    pipe = load_run_pipeline(run, merge=False)
    peft = {
        name: (m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach(), m.scaling[a])
        for name, m in pipe.unet.named_modules()
        if isinstance(m, LoraLayer)
        for a in m.active_adapters
    }
    assert {s for _, _, s in peft.values()} == {1.0}  # lora_alpha = r
    for dtype, cast in (("fp32", torch.float32), ("fp16", torch.float16)):
        report = export_lora(run, tmp_path / f"{dtype}.safetensors", dtype=dtype, samples=0)
        file = load_file(str(report.path))
        assert {r.rank for r in report.layers} == {4}
        assert len(report.layers) == len(peft)
        for r in report.layers:
            down, up, _ = peft[r.module]
            assert torch.equal(file[f"{r.key}.lora_down.weight"], down.to(cast))
            assert torch.equal(file[f"{r.key}.lora_up.weight"], up.to(cast))
            assert float(file[f"{r.key}.alpha"]) == 4.0


def test_full_run_exports_its_changed_layers(tiny_dir, runs, tmp_path):
    run = make_full_run(runs / "full", tiny_dir)
    report = export_diff(run, tmp_path / "f.safetensors", samples=0)
    assert [r.module for r in report.layers] == ["conv_in"]
    assert report.worst.error <= FP16_DIFF


# ----------------------------------------------------------------------------- files


def test_metadata_for_a1111_forge_and_sdatom(full_rank, atoms_run):
    with open(full_rank.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data_hash = hashlib.sha256(f.read()).hexdigest()
    meta = header["__metadata__"]
    assert meta["sshs_model_hash"] == data_hash  # A1111: sha256 of the bytes after the header
    assert meta["ss_output_name"] == "full-rank" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["sdatom_method"] == "atoms" and meta["sdatom_preset"] == "atoms-attn"
    assert meta["sdatom_trigger"] == "sks dog" and meta["sdatom_base_fingerprint"]
    assert "lora_adapter_metadata" not in meta  # diffusers' peft path raises with .alpha keys
    tensors = load_file(str(full_rank.path))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    assert alphas == {float(meta["ss_network_alpha"])}  # one alpha: the most common rank
    conv = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert conv.shape[1:] == (32, 3, 3) and up.shape[2:] == (1, 1)  # LoCon layout


def test_diff_says_its_size_first(atoms_run, tmp_path):
    lines: list[str] = []
    report = export_diff(atoms_run, tmp_path / "x.safetensors", samples=0, echo=lines.append)
    assert lines[0].startswith("writing the exact update of 65 layers") and "MB" in lines[0]
    tensors = load_file(str(report.path))
    assert all(k.endswith(".diff") for k in tensors)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 4, "max_error": 0.1}, "either --rank or --max-error"),
        ({"rank": 0}, "--rank 0"),
        ({"max_error": 1.5}, "--max-error 1.5"),
        ({"dense": "svd"}, "--dense 'svd'"),
    ],
)
def test_bad_lora_options_are_one_line_errors(atoms_run, tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        export_lora(atoms_run, tmp_path / "x.safetensors", samples=0, **kwargs)
    with pytest.raises(UsageError, match="must end in .safetensors"):
        export_lora(atoms_run, tmp_path / "x.pt", samples=0)
    (tmp_path / "y.safetensors").write_bytes(b"keep")
    with pytest.raises(UsageError, match="already exists"):
        export_diff(atoms_run, tmp_path / "y.safetensors", samples=0)
    assert (tmp_path / "y.safetensors").read_bytes() == b"keep"


# ----------------------------------------------------------------------------- LoRA runs, scale


def test_lora_run_folder_loads_with_load_lora_weights(tiny_dir, tmp_path):
    from peft import LoraConfig

    pipe = load_pipeline(str(tiny_dir))
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    write_config(tmp_path, str(tiny_dir), "lora")
    saved = get_method("lora").save(pipe.unet, tmp_path, None, pipe)
    assert saved.name == "pytorch_lora_weights.safetensors"
    assert read_run(tmp_path).adapter == saved
    other = load_pipeline(str(tiny_dir))
    other.load_lora_weights(str(tmp_path))  # the run folder itself, no weight_name
    assert _lora_modules(other.unet) == _lora_modules(pipe.unet)


def _atoms_file(tiny_dir, tmp_path, preset: str) -> Path:
    from sdatom.atoms import add_atoms, save_atoms, trainable_parameters

    pipe = load_pipeline(str(tiny_dir))
    add_atoms(pipe.unet, preset)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return save_atoms(pipe.unet, tmp_path / f"{preset}.safetensors")


def _deltas(unet) -> dict[str, torch.Tensor]:
    from sdatom.atoms import AtomLayer

    return {
        n: m.get_delta_weight().detach()
        for n, m in unet.named_modules()
        if isinstance(m, AtomLayer)
    }


@pytest.mark.parametrize("preset", ["atoms-attn", "atoms-oc"])
def test_load_atoms_scale_multiplies_the_update(tiny_dir, tmp_path, preset):
    path = _atoms_file(tiny_dir, tmp_path, preset)
    one, half = load_pipeline(str(tiny_dir)), load_pipeline(str(tiny_dir))
    sdatom.load_atoms(one, path)
    sdatom.load_atoms(half, path, scale=0.5)
    full, scaled = _deltas(one.unet), _deltas(half.unet)
    assert full.keys() == scaled.keys() and full
    for name in full:
        assert full[name].abs().max() > 0
        torch.testing.assert_close(scaled[name], 0.5 * full[name], rtol=1e-5, atol=1e-7)
    zero = load_pipeline(str(tiny_dir))
    sdatom.load_atoms(zero, path, scale=0.0)
    assert all(d.abs().max() == 0 for d in _deltas(zero.unet).values())


def test_atoms_and_a_diffusers_lora_on_one_pipeline(tiny_dir, tmp_path, runs):
    """Atoms on the convolutions (preset ``atoms``) live, a diffusers LoRA on the attention
    projections: the UNet computes both updates at once."""
    path = _atoms_file(tiny_dir, tmp_path, "atoms")
    lora_run = make_lora_run(runs / "lora-both", tiny_dir)

    def unet_out(pipe):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=gen)
        text = torch.randn(1, 77, 32, generator=gen)
        with torch.no_grad():
            return pipe.unet(x, 10, encoder_hidden_states=text).sample

    both = load_pipeline(str(tiny_dir))
    sdatom.load_atoms(both, path, scale=0.7)
    both.load_lora_weights(str(lora_run), weight_name="adapter.safetensors")
    assert _lora_modules(both.unet) and _deltas(both.unet)
    live = unet_out(both)

    # the same updates folded into plain weights, each through its own library
    ref = load_pipeline(str(tiny_dir))
    sdatom.load_atoms(ref, path, scale=0.7)
    sdatom.merge_atoms(ref.unet)
    sdatom.remove_atoms(ref.unet, merge=True)
    ref.load_lora_weights(str(lora_run), weight_name="adapter.safetensors")
    ref.fuse_lora()
    ref.unload_lora_weights()
    torch.testing.assert_close(live, unet_out(ref), rtol=1e-4, atol=1e-5)

    atoms_only = load_pipeline(str(tiny_dir))
    sdatom.load_atoms(atoms_only, path, scale=0.7)
    assert (live - unet_out(atoms_only)).abs().max() > 1e-4  # the LoRA did something


# ----------------------------------------------------------------------------- CLI, card, hub


def _cli(*args: str):
    from typer.testing import CliRunner

    from sdatom.cli import app

    return CliRunner().invoke(app, ["export", *args])


def test_cli_lora_prints_size_errors_and_image_difference_and_writes_a_card(atoms_run, tmp_path):
    grid = atoms_run / "samples" / "s1" / "grid.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(grid)
    out = tmp_path / "export" / "dog.safetensors"
    result = _cli("--run", str(atoms_run), "--lora", str(out), "--max-error", "0.3",
                  "--dense", "lora", "--sample-steps", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.output
    assert re.search(rf"wrote {re.escape(str(out))} \(\d+\.\d+ [kM]B, 65 layers\)", text)
    assert "worst" in text and "median" in text and "images vs the exact adapter" in text
    card = (out.parent / "README.md").read_text()
    for needle in ("a photo of sks dog", "atoms-attn", "load_lora_weights", "models/loras",
                   "<lora:dog:1>", "![samples](samples.png)", "median"):  # fmt: skip
        assert needle in card, needle
    assert (out.parent / "samples.png").read_bytes() == grid.read_bytes()
    from huggingface_hub import ModelCard

    assert "sdatom" in ModelCard.load(out.parent / "README.md").data.tags


def test_cards_leave_a_foreign_readme_alone(atoms_run, tmp_path):
    (tmp_path / "README.md").write_text("my notes\n")
    result = _cli("--run", str(atoms_run), "--diff", str(tmp_path / "d.safetensors"),
                  "--samples", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MB (fp16)" in result.output.splitlines()[0]  # the size, said first
    assert (tmp_path / "README.md").read_text() == "my notes\n"
    assert "model card: skipped" in result.output


def test_merged_export_gets_a_card_too(atoms_run, tmp_path):
    result = _cli("--run", str(atoms_run), "--merged", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert "from_pretrained" in (tmp_path / "m" / "README.md").read_text()


def test_push_to_hub_offline_is_one_line_and_keeps_the_file(atoms_run, tmp_path):
    out = tmp_path / "dog.safetensors"
    result = _cli("--run", str(atoms_run), "--diff", str(out), "--samples", "0",
                  "--push-to-hub", "me/dog")  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "--push-to-hub me/dog" in errors[0] and "offline" in errors[0]
    assert out.is_file() and (tmp_path / "README.md").is_file()


def test_cli_refuses_lora_options_without_lora(atoms_run, tmp_path):
    result = _cli("--run", str(atoms_run), "--diff", str(tmp_path / "d.safetensors"),
                  "--rank", "4")  # fmt: skip
    assert (
        result.exit_code == 2 and "--rank, --max-error and --dense go with --lora" in result.output
    )
    result = _cli("--run", str(atoms_run), "--lora", str(tmp_path / "a.safetensors"),
                  "--rank", "4", "--max-error", "0.1")  # fmt: skip
    assert result.exit_code == 2 and "either --rank or --max-error" in result.output
    assert not (tmp_path / "a.safetensors").exists()
