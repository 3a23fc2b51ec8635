"""Sampling: per-image seeds, reproducibility, the output folder format, prompts, adapters."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_runs import make_atoms_run, make_lora_run

from sdatom.errors import DataError, UsageError
from sdatom.runs import load_run_pipeline, read_run
from sdatom.sample import (
    generate,
    make_grid,
    read_prompts_file,
    resolve_prompts,
    run_sampling,
    sample,
)

DREAMBENCH = Path("/work/shared/dreambench/prompts_and_classes.txt")
FAST = {"steps": 2, "guidance": 7.5}
# float32 images in [0, 1]: the same computation in another order (merged weights vs a live
# adapter) differs by rounding only, far below one 8-bit level (0.004).
ATOL_FP32 = 1e-4


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def _arrays(pipe, prompts, **kwargs) -> np.ndarray:
    return np.stack([s.image for s in generate(pipe, prompts, **{**FAST, **kwargs})])


@pytest.fixture(scope="module")
def atoms_run(tiny_dir, tmp_path_factory):
    return make_atoms_run(tmp_path_factory.mktemp("runs") / "dog", tiny_dir)


def test_guidance_left_unset_is_the_pipelines_own(tiny_pipe, tmp_path):
    from sdatom.sample import default_guidance

    assert default_guidance(tiny_pipe) == 7.5  # diffusers' StableDiffusionPipeline default
    unset = _arrays(tiny_pipe, ["a dog"], n=1, guidance=None)
    np.testing.assert_array_equal(unset, _arrays(tiny_pipe, ["a dog"], n=1, guidance=7.5))
    assert not np.array_equal(unset, _arrays(tiny_pipe, ["a dog"], n=1, guidance=1.5))
    sample(tiny_pipe, ["a dog"], n=1, steps=2, output_dir=tmp_path)  # the manifest says which
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["guidance"] == 7.5


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_image_depends_only_on_prompt_and_seed(tiny_pipe, tmp_path):
    # Batch size 1 (the default): bit-identical PNGs whatever n and the prompt order.
    a = sample(tiny_pipe, ["a dog", "a cat"], n=3, output_dir=tmp_path / "a", **FAST)
    b = sample(tiny_pipe, ["a cat"], n=1, output_dir=tmp_path / "b", **FAST)
    c = sample(tiny_pipe, ["a cat", "a dog"], n=2, seed=1, output_dir=tmp_path / "c", **FAST)
    # "a cat", seed 0: image 0 of prompt 1 in a, image 0 of prompt 0 in b.
    assert a[3].name == "p001-i00.png" and b[0].name == "p000-i00.png"
    np.testing.assert_array_equal(_pixels(a[3]), _pixels(b[0]))
    # "a dog", seed 1: image 1 in a; image 0 of prompt 1 with --seed 1 in c.
    np.testing.assert_array_equal(_pixels(a[1]), _pixels(c[2]))
    assert not np.array_equal(_pixels(a[0]), _pixels(a[1]))  # seeds differ: images differ


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_batching_changes_images_only_by_float_rounding(tiny_pipe):
    # Batched kernels sum in another order: the same noise, rounding-level differences.
    batched = _arrays(tiny_pipe, ["a dog", "a cat"], n=2, batch_size=3)
    single = _arrays(tiny_pipe, ["a dog", "a cat"], n=2, batch_size=1)
    np.testing.assert_allclose(batched, single, atol=ATOL_FP32, rtol=0)


def test_same_seed_and_settings_give_identical_images(tiny_pipe):
    first = _arrays(tiny_pipe, ["a dog"], n=2, seed=5)
    again = _arrays(tiny_pipe, ["a dog"], n=2, seed=5)
    np.testing.assert_array_equal(first, again)


def test_output_folder_manifest_chunks_and_grid(tiny_pipe, tmp_path):
    out = tmp_path / "out"
    paths = sample(
        tiny_pipe,
        ["a dog", "a red car"],
        n=2,
        seed=3,
        negative_prompt="blurry",
        output_dir=out,
        settings={"model": "tiny", "adapter": "runs/x/adapter.safetensors"},
        **FAST,
    )
    assert [p.name for p in paths] == [
        "p000-i00.png",
        "p000-i01.png",
        "p001-i00.png",
        "p001-i01.png",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"][3] == {
        "file": "p001-i01.png",
        "prompt": "a red car",
        "seed": 4,
        "prompt_index": 1,
    }
    settings = manifest["settings"]
    assert settings["model"] == "tiny" and settings["adapter"] == "runs/x/adapter.safetensors"
    assert settings["steps"] == 2 and settings["guidance"] == 7.5
    assert settings["negative_prompt"] == "blurry"
    assert settings["scheduler"] == "PNDMScheduler"
    assert (settings["height"], settings["width"]) == (64, 64)
    with Image.open(paths[2]) as img:
        assert img.text["prompt"] == "a red car" and img.text["seed"] == "3"
        assert img.text["negative_prompt"] == "blurry" and img.text["steps"] == "2"
        assert img.text["model"] == "tiny" and "adapter" in img.text
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 64, 2 * 64)  # one row per prompt
    # The eval engineer's reader understands the folder.
    from sdatom.eval.images import read_generated

    images = read_generated(out)
    assert [(g.prompt, g.seed, g.prompt_index) for g in images][1] == ("a dog", 4, 0)


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler"])
def test_schedulers_run_and_restore_the_pipeline(tiny_pipe, name):
    original = tiny_pipe.scheduler
    images = _arrays(tiny_pipe, ["a dog"], n=1, scheduler=name)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert tiny_pipe.scheduler is original


def test_unknown_scheduler_and_bad_counts_are_usage_errors(tiny_pipe, tmp_path):
    with pytest.raises(UsageError, match="--scheduler 'plms'"):
        _arrays(tiny_pipe, ["a dog"], n=1, scheduler="plms")
    with pytest.raises(UsageError, match="-n must be"):
        sample(tiny_pipe, ["a dog"], n=0, output_dir=tmp_path)
    with pytest.raises(UsageError, match="no prompts"):
        sample(tiny_pipe, [], output_dir=tmp_path)


def test_merged_and_unmerged_atoms_give_the_same_images(atoms_run, tiny_pipe):
    merged = _arrays(load_run_pipeline(atoms_run), ["a sks dog"], n=2)
    live = _arrays(load_run_pipeline(atoms_run, merge=False), ["a sks dog"], n=2)
    np.testing.assert_allclose(merged, live, atol=ATOL_FP32, rtol=0)
    base = _arrays(tiny_pipe, ["a sks dog"], n=2)
    assert np.abs(merged - base).max() > 0.01  # the adapter does change the images


def test_merged_and_unmerged_lora_give_the_same_images(tiny_dir, tmp_path):
    run = make_lora_run(tmp_path / "lora", tiny_dir)
    fused = _arrays(load_run_pipeline(run), ["a sks dog"], n=1)
    live = _arrays(load_run_pipeline(run, merge=False), ["a sks dog"], n=1)
    np.testing.assert_allclose(fused, live, atol=ATOL_FP32, rtol=0)


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_run_sampling_adapted_and_base_use_the_same_seeds(atoms_run):
    common = {"run": atoms_run, "prompts": ["a sks dog"], "n": 2, "device": "cpu", **FAST}
    adapted = run_sampling(**common)
    base = run_sampling(**common, base=True)
    assert adapted.output_dir.parent == atoms_run / "samples"
    assert adapted.output_dir != base.output_dir and adapted.grid.is_file()
    a_manifest = json.loads((adapted.output_dir / "manifest.json").read_text())
    b_manifest = json.loads((base.output_dir / "manifest.json").read_text())
    assert a_manifest["images"] == b_manifest["images"]
    assert a_manifest["settings"]["adapter"] == str(atoms_run / "adapter.safetensors")
    assert b_manifest["settings"]["adapter"] is None
    assert a_manifest["settings"]["model"] == b_manifest["settings"]["model"]
    assert not np.array_equal(_pixels(adapted.images[0]), _pixels(base.images[0]))


def test_run_sampling_plain_model_writes_under_samples(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_sampling(model=str(tiny_dir), prompts=["a dog"], n=1, device="cpu", **FAST)
    assert result.output_dir.parent == Path("samples") and len(result.images) == 1


def test_prompts_file_skips_comments_and_blanks(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\na sks dog\n\n  # indented comment\n a sks dog in snow \n")
    assert read_prompts_file(f) == ["a sks dog", "a sks dog in snow"]
    assert resolve_prompts(["first"], f) == ["first", "a sks dog", "a sks dog in snow"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="holds no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(UsageError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")


def test_missing_prompts_and_protocol_misuse_are_usage_errors(atoms_run):
    with pytest.raises(UsageError, match="no prompts"):
        resolve_prompts()
    with pytest.raises(UsageError, match="--protocol needs --run"):
        resolve_prompts(protocol=True)
    with pytest.raises(UsageError, match="replaces --prompt"):
        resolve_prompts(["x"], protocol=True, run=read_run(atoms_run))


def test_protocol_uses_the_runs_subject(atoms_run):
    prompts = resolve_prompts(protocol=True, run=read_run(atoms_run))
    assert len(prompts) == 24 and all("sks dog" in p for p in prompts)


@pytest.mark.skipif(not DREAMBENCH.is_file(), reason="DreamBench prompt file not available")
def test_protocol_with_dreambench_file(atoms_run, tmp_path):
    prompts = resolve_prompts(protocol=DREAMBENCH, run=read_run(atoms_run))
    assert len(prompts) == 25 and all("sks dog" in p for p in prompts)
    # An object class takes the object list.
    run = read_run(atoms_run)
    backpack = type(run)(
        run.path, {**run.config, "class_name": "backpack"}, run.method, run.adapter
    )
    objects = resolve_prompts(protocol=DREAMBENCH, run=backpack)
    assert len(objects) == 25 and objects != prompts


def test_make_grid_near_square():
    cells = [Image.new("RGB", (8, 8)) for _ in range(5)]
    assert make_grid(cells).size == (3 * 8, 2 * 8)
    assert make_grid(cells, rows=5).size == (8, 5 * 8)


def test_cli_sample_end_to_end(atoms_run, tmp_path):
    from typer.testing import CliRunner

    from sdatom.cli import app

    args = ["sample", "--run", str(atoms_run), "-p", "a sks dog", "-n", "1", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "o" / "grid.png") in result.output
    assert (tmp_path / "o" / "p000-i00.png").is_file()
    result = CliRunner().invoke(app, ["sample", "--run", str(atoms_run)])
    assert result.exit_code == 2 and "no prompts" in result.output


def test_dtype_auto_is_fp16_on_cuda_fp32_elsewhere_and_is_reported(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from sdatom.cli import app
    from sdatom.models import auto_dtype, resolve_dtype

    assert auto_dtype(torch.device("cuda")) == "fp16"
    assert auto_dtype(torch.device("cpu")) == auto_dtype(torch.device("mps")) == "fp32"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    out = tmp_path / "s"
    args = ["sample", "--model", str(tiny_dir), "-p", "a dog", "-n", "1", "--steps", "2",
            "--height", "32", "--width", "32", "--device", "cpu", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "(cpu, fp32)" in result.output  # says what --dtype auto chose
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert (settings["device"], settings["dtype"]) == ("cpu", "fp32")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(("tty", "progress", "shown"), [(True, True, True),
                         (True, False, False), (False, True, False)])  # fmt: skip
def test_sampling_shows_a_progress_bar_on_a_terminal_only(
    tiny_pipe, tmp_path, monkeypatch, tty, progress, shown
):
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    sample(tiny_pipe, ["a", "b"], output_dir=tmp_path, n=2, progress=progress, **FAST)
    assert ("sample:" in err.getvalue() and "/4 [" in err.getvalue()) == shown, err.getvalue()
    if shown:  # images done / total, the rate and the ETA
        assert re.search(r"\d/4 \[\d\d:\d\d<\d\d:\d\d", err.getvalue()), err.getvalue()
