"""Bad input through the CLI: one clear red line naming the file or option, never a traceback.

Every case drives ``sdatom`` in-process with Typer's CliRunner and makes its own bad files in
tmp_path. Input and usage errors exit with code 2. Cases that are allowed (one image, small
images, odd colour modes, odd file names) train 2 steps of the tiny model end to end.
The image decoding itself is tested at the library level in test_data.py.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageCms
from typer.testing import CliRunner

from sdatom.cli import app

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def _photo(path: Path, size=(48, 40), seed: int = 0, **save) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **save)
    return path


def _subject(tmp_path: Path, n: int = 2, name: str = "subject") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i in range(n):
        _photo(folder / f"{i:02d}.png", seed=i)
    return folder


def _train(subject: Path | str, output: Path, *extra: str):
    """`sdatom train` on the tiny model: 2 steps at 32 px, no prior, no checkpoints."""
    args = [
        "train",
        "--subject",
        str(subject),
        "--class-name",
        "dog",
        "--model",
        "tiny",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--no-prior",
        "--report-to",
        "none",
        "--checkpoint-every",
        "0",
        "--output",
        str(output),
        *extra,
    ]
    return runner.invoke(app, args)


def _error_line(result, *needles: str, code: int = 2) -> str:
    """The command failed with ``code`` and exactly one ``error:`` line holding ``needles``."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _trained(result, output: Path) -> None:
    assert result.exit_code == 0, result.output
    assert "trained" in result.stdout
    assert (output / "adapter.safetensors").is_file()
    assert json.loads((output / "train_summary.json").read_text())["steps"] == 2


def _warned(record, *needles: str) -> str:
    messages = [str(w.message) for w in record]
    hits = [m for m in messages if all(n in m for n in needles)]
    assert hits, messages
    return hits[0]


@pytest.fixture(autouse=True)
def _tiny_built(tiny_dir):
    """``--model tiny`` resolves to the session's built copy (built once)."""


# ----------------------------------------------------------------------------- subject folder


def test_subject_folder_missing(tmp_path):
    result = _train(tmp_path / "nowhere", tmp_path / "run")
    _error_line(result, "nowhere", "does not exist")


def test_subject_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _train(tmp_path / "empty", tmp_path / "run")
    _error_line(result, "empty", "is empty")


def test_subject_folder_without_images(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no photos here")
    with pytest.warns(UserWarning, match="readme.txt"):
        result = _train(folder, tmp_path / "run")
    _error_line(result, str(folder), "holds no images")


def test_single_image_trains_with_a_warning(tmp_path):
    folder = _subject(tmp_path, n=1)
    with pytest.warns(UserWarning) as record:
        result = _train(folder, tmp_path / "run")
    _trained(result, tmp_path / "run")
    _warned(record, str(folder), "single image", "3-5 photos")


def test_folder_warnings_are_printed_once(tmp_path):
    folder = _subject(tmp_path, n=1)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    with pytest.warns(UserWarning) as record:
        _trained(_train(folder, tmp_path / "run"), tmp_path / "run")
    messages = [str(w.message) for w in record]
    assert sum("single image" in m for m in messages) == 1, messages
    assert sum("notes.pdf" in m for m in messages) == 1, messages


def test_non_image_files_are_skipped_with_a_warning_naming_them(tmp_path):
    folder = _subject(tmp_path)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    (folder / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.warns(UserWarning) as record:
        result = _train(folder, tmp_path / "run")
    _trained(result, tmp_path / "run")
    _warned(record, "skipping non-image file(s)", "clip.mp4", "notes.pdf")


# ----------------------------------------------------------------------------- broken files


def test_text_file_named_jpg(tmp_path):
    folder = _subject(tmp_path)
    (folder / "fake.jpg").write_text("this is not a photo\n")
    result = _train(folder, tmp_path / "run")
    _error_line(result, "fake.jpg", "is not an image")


def test_truncated_jpeg(tmp_path):
    folder = _subject(tmp_path)
    _photo(tmp_path / "whole.jpg", size=(64, 64))
    full = (tmp_path / "whole.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(full[: len(full) // 2])
    result = _train(folder, tmp_path / "run")
    _error_line(result, "cut.jpg", "corrupt or truncated")


def test_zero_byte_file(tmp_path):
    folder = _subject(tmp_path)
    (folder / "zero.png").touch()
    result = _train(folder, tmp_path / "run")
    _error_line(result, "zero.png", "empty (0 bytes)")


# ----------------------------------------------------------------------------- image modes


def _swapped_primaries_profile() -> bytes:
    """sRGB with red and blue primaries swapped: a valid RGB ICC profile that is not sRGB."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack(">I", data[128:132])
    table = {bytes(data[132 + 12 * i : 136 + 12 * i]): 136 + 12 * i for i in range(count)}
    red, blue = table[b"rXYZ"], table[b"bXYZ"]
    data[red : red + 8], data[blue : blue + 8] = data[blue : blue + 8], data[red : red + 8]
    return bytes(data)


def _one_of_each_mode(folder: Path) -> list[str]:
    """One file per colour mode / container the loader handles; returns their names."""
    folder.mkdir()
    size = (48, 40)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(size))
    rgba.save(folder / "rgba.png")
    rgb.convert("LA").save(folder / "la.png")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    deep = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    frames = [Image.new("RGB", size, c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[1].save(folder / "pages.tiff", save_all=True, append_images=frames[2:])
    Image.init()
    if "MPO" in Image.SAVE_ALL:
        frames[2].save(folder / "camera.jpg", format="MPO", save_all=True, append_images=frames[:1])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view
    rgb.save(folder / "rotated.jpg", exif=exif, quality=95)
    rgb.save(folder / "wide-gamut.png", icc_profile=_swapped_primaries_profile())
    return sorted(p.name for p in folder.iterdir())


def test_one_image_of_each_mode_trains_end_to_end(tmp_path):
    names = _one_of_each_mode(tmp_path / "modes")
    assert len(names) >= 11
    result = _train(tmp_path / "modes", tmp_path / "run")
    _trained(result, tmp_path / "run")


def test_very_small_image_is_upscaled_with_a_warning(tmp_path):
    folder = _subject(tmp_path)
    _photo(folder / "tiny.png", size=(12, 10))
    with pytest.warns(UserWarning) as record:
        result = _train(folder, tmp_path / "run")
    _trained(result, tmp_path / "run")
    _warned(record, "upscaling", "tiny.png", "12x10", "32 px")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_with_the_reason(tmp_path):
    folder = _subject(tmp_path)
    (folder / "bomb.png").write_bytes(_png_header_only(40000, 40000))  # 1.6 GP in 57 bytes
    result = _train(folder, tmp_path / "run")
    _error_line(result, "bomb.png", "decompression bomb", "downscale")


# ----------------------------------------------------------------------------- file names


def test_names_with_spaces_and_non_ascii_characters(tmp_path):
    folder = tmp_path / "mon chien été 🐕"
    folder.mkdir()
    _photo(folder / "photo 1 (copy).png", seed=1)
    _photo(folder / "été à la plage.jpg", seed=2)
    _photo(folder / "狗.webp", seed=3)
    result = _train(folder, tmp_path / "run ünïcode")
    _trained(result, tmp_path / "run ünïcode")


def test_nested_folders_are_ignored_with_a_warning(tmp_path):
    folder = _subject(tmp_path)
    _photo(folder / "more" / "extra.png")
    with pytest.warns(UserWarning) as record:
        result = _train(folder, tmp_path / "run")
    _trained(result, tmp_path / "run")
    _warned(record, "ignoring nested folder(s)", "more", "not used")


# ----------------------------------------------------------------------------- config


def _config_file(tmp_path: Path, **values) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def test_config_unknown_key_names_the_closest_valid_one(tmp_path):
    config = _config_file(tmp_path, stpes=10)
    result = _train(_subject(tmp_path), tmp_path / "run", "--config", str(config))
    _error_line(result, str(config), "unknown key 'stpes'", "did you mean 'steps'")


def test_config_wrong_type(tmp_path):
    config = _config_file(tmp_path, steps="many")
    result = _train(_subject(tmp_path), tmp_path / "run", "--config", str(config))
    _error_line(result, str(config), "steps must be int", "'many'")


def test_option_wrong_type_is_a_usage_error(tmp_path):
    result = _train(_subject(tmp_path), tmp_path / "run", "--steps", "many")
    assert result.exit_code == 2
    assert "--steps" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--resolution", "30", "resolution: must be a positive multiple of 8"),
        ("--steps", "-1", "steps: must be a positive integer, got -1"),
        ("--lr", "0", "lr: must be a positive number, got 0.0"),
    ],
)
def test_out_of_range_values(tmp_path, option, value, message):
    result = _train(_subject(tmp_path), tmp_path / "run", option, value)
    _error_line(result, message)


def test_resume_path_without_a_checkpoint(tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    result = _train(_subject(tmp_path), tmp_path / "run", "--resume", str(empty))
    _error_line(result, f"--resume {empty}", "no checkpoint there")


def test_resume_latest_without_a_checkpoint(tmp_path):
    result = _train(_subject(tmp_path), tmp_path / "run", "--resume", "latest")
    _error_line(result, "--resume latest", "holds no checkpoint yet")


def test_finished_run_is_refused_unless_overwrite(tmp_path):
    subject, run = _subject(tmp_path), tmp_path / "run"
    _trained(_train(subject, run), run)
    before = (run / "adapter.safetensors").read_bytes()
    _error_line(_train(subject, run), f"--output {run}", "finished run", "--overwrite")
    assert (run / "adapter.safetensors").read_bytes() == before
    _trained(_train(subject, run, "--overwrite", "--seed", "1"), run)
    assert (run / "adapter.safetensors").read_bytes() != before


# ----------------------------------------------------------------------------- models


def test_unreachable_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _train(_subject(tmp_path), tmp_path / "run", "--model", "nobody/no-such-model")
    _error_line(result, "'nobody/no-such-model'", "offline", "--model")


def test_folder_that_is_not_a_pipeline(tmp_path):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    result = _train(_subject(tmp_path), tmp_path / "run", "--model", str(folder))
    _error_line(result, str(folder), "not a diffusers pipeline folder")


def test_sd3_model_is_refused_with_the_reason(tmp_path):
    folder = tmp_path / "sd3"
    folder.mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0"}
    (folder / "model_index.json").write_text(json.dumps(index))
    result = _train(_subject(tmp_path), tmp_path / "run", "--model", str(folder))
    _error_line(result, str(folder), "StableDiffusion3Pipeline", "one patch-embedding convolution")


def test_corrupted_safetensors_checkpoint(tmp_path, tiny_dir):
    whole = (Path(tiny_dir) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(whole[: len(whole) // 3])
    result = _train(_subject(tmp_path), tmp_path / "run", "--model", str(bad))
    _error_line(result, str(bad), "cannot load checkpoint", "truncated or corrupt")


# ----------------------------------------------------------------------------- adapters


def _sample(run: Path, tmp_path: Path, *extra: str):
    args = ["sample", "--run", str(run), "-p", "a sks dog", "-n", "1", "--steps", "2"]
    return runner.invoke(app, [*args, "--device", "cpu", "-o", str(tmp_path / "out"), *extra])


def test_lora_file_where_the_run_says_atoms(tmp_path, tiny_dir):
    from test_runs import make_lora_run

    run = make_lora_run(tmp_path / "run", Path(tiny_dir))
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "method": "atoms"}))
    result = _sample(run, tmp_path)
    _error_line(result, "adapter.safetensors", "is a LoRA file", "method: atoms")


def test_lora_file_given_to_load_atoms(tmp_path, tiny_dir, tiny_pipe):
    from test_runs import make_lora_run

    import sdatom
    from sdatom.errors import AdapterError

    run = make_lora_run(tmp_path / "run", Path(tiny_dir))
    with pytest.raises(AdapterError, match=r"adapter.safetensors: looks like a LoRA file") as e:
        sdatom.load_atoms(tiny_pipe, run / "adapter.safetensors")
    assert e.value.exit_code == 2


@pytest.fixture(scope="module")
def atoms_run(tiny_dir, tmp_path_factory):
    from test_runs import make_atoms_run

    return make_atoms_run(tmp_path_factory.mktemp("runs") / "dog", Path(tiny_dir))


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """A tiny pipeline of the same architecture with other random weights (seed 123)."""
    from sdatom.models import build_pipeline

    folder = tmp_path_factory.mktemp("other") / "tiny-123"
    build_pipeline("tiny", seed=123).save_pretrained(folder, safe_serialization=True)
    return folder


def test_atoms_of_another_base_model_are_refused(atoms_run, other_tiny, tmp_path):
    import sdatom
    from sdatom.errors import AdapterError

    pipe = sdatom.load_pipeline(str(other_tiny))
    with pytest.raises(AdapterError, match="does not match this base model.*fingerprint"):
        sdatom.load_atoms(pipe, atoms_run / "adapter.safetensors")
    result = _sample(atoms_run, tmp_path, "--model", str(other_tiny))
    _error_line(result, "adapter.safetensors", "does not match this base model", "--force")
    forced = _sample(atoms_run, tmp_path / "forced", "--model", str(other_tiny), "--force")
    assert forced.exit_code == 0, forced.output  # loaded anyway (the library warns)


def test_truncated_adapter_file(atoms_run, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(atoms_run, run)
    whole = (run / "adapter.safetensors").read_bytes()
    (run / "adapter.safetensors").write_bytes(whole[: len(whole) // 2])
    result = _sample(run, tmp_path)
    _error_line(result, "adapter.safetensors", "truncated or corrupt")
