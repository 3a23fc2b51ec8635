"""Subject folders, robust image loading, captions, the DreamBooth dataset and class-image cache.

Every bad file is made here in tmp_path; DreamBench's folders are only read when present.
"""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from sdatom.data import (
    DreamBoothDataset,
    caption_for,
    class_image_cache_dir,
    class_image_path,
    class_prompt,
    collate_dreambooth,
    find_images,
    instance_prompt,
    list_cached_class_images,
    load_image,
    prepare_image,
)
from sdatom.errors import DataError, UsageError

REPO = Path(__file__).resolve().parents[1]


def _shared_dreambench() -> Path:
    root = os.environ.get("SDATOM_SHARED")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared"
    return base / "dreambench"


def _save(path: Path, color=(200, 30, 30), size=(32, 24), **kw) -> Path:
    Image.new("RGB", size, color).save(path, **kw)
    return path


def _subject(tmp_path: Path, n: int = 3, size=(32, 24)) -> Path:
    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(n):
        _save(folder / f"{i:02d}.png", color=(40 * i, 100, 200 - 40 * i), size=size)
    return folder


def _messages(record) -> str:
    return "\n".join(str(w.message) for w in record)


# --------------------------------------------------------------------------- find_images


def test_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="subject folder .*nope does not exist"):
        find_images(missing)


def test_file_instead_of_folder(tmp_path):
    path = _save(tmp_path / "a.png")
    with pytest.raises(DataError, match="a.png is not a folder"):
        find_images(path)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*is empty"):
        find_images(tmp_path / "empty")


def test_folder_without_images_names_it_and_warns_about_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.md").write_text("hello")
    with pytest.warns(UserWarning, match="notes.md"), pytest.raises(DataError, match="no images"):
        find_images(folder)


def test_data_error_is_a_usage_error_with_exit_code_2():
    assert issubclass(DataError, UsageError)
    assert DataError.exit_code == 2


def test_single_image_warns(tmp_path):
    folder = _subject(tmp_path, n=1)
    with pytest.warns(UserWarning, match="single image.*3-5 photos"):
        assert len(find_images(folder)) == 1


def test_non_image_files_are_skipped_with_a_warning_naming_them(tmp_path):
    folder = _subject(tmp_path, n=3)
    (folder / "readme.md").write_text("x")
    (folder / "00.txt").write_text("a photo of sks robot")  # caption beside an image: silent
    (folder / "orphan.txt").write_text("no image")  # caption without an image: warned
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden: silent
    with pytest.warns(UserWarning) as record:
        images = find_images(folder)
    assert [p.name for p in images] == ["00.png", "01.png", "02.png"]
    text = _messages(record)
    assert "readme.md" in text and "orphan.txt" in text
    assert "00.txt" not in text and "DS_Store" not in text


def test_suffix_case_and_sorting(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for name in ["b.JPG", "a.png", "c.Jpeg", "d.webp"]:
        fmt = {"JPG": "JPEG", "Jpeg": "JPEG"}.get(name.split(".")[1])
        _save(folder / name, format=fmt)
    assert [p.name for p in find_images(folder)] == ["a.png", "b.JPG", "c.Jpeg", "d.webp"]


def test_names_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "mon chien 🐶"
    folder.mkdir()
    names = ["photo 1.jpg", "été à Paris.png", "犬.jpeg"]
    for name in names:
        _save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    images = find_images(folder)
    assert sorted(p.name for p in images) == sorted(names)
    for p in images:
        assert load_image(p).mode == "RGB"


def test_nested_folders_ignored_with_warning_unless_recursive(tmp_path):
    folder = _subject(tmp_path, n=2)
    nested = folder / "more"
    nested.mkdir()
    _save(nested / "x.png")
    (folder / ".git").mkdir()  # hidden folders are never searched
    _save(folder / ".git" / "y.png")
    with pytest.warns(UserWarning, match="ignoring nested folder.*more.*recursive=True"):
        flat = find_images(folder)
    assert [p.name for p in flat] == ["00.png", "01.png"]
    deep = find_images(folder, recursive=True)
    assert [p.relative_to(folder).as_posix() for p in deep] == ["00.png", "01.png", "more/x.png"]


# --------------------------------------------------------------------------- broken files


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a photo\n")
    with pytest.raises(DataError, match="fake.jpg is not an image"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    full = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(DataError, match="cut.jpg is corrupt or truncated"):
        load_image(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.png"
    path.touch()
    with pytest.raises(DataError, match=r"zero.png is empty \(0 bytes\)"):
        load_image(path)


def test_missing_image_file(tmp_path):
    with pytest.raises(DataError, match="gone.png does not exist"):
        load_image(tmp_path / "gone.png")


def test_dataset_refuses_a_broken_photo_in_the_folder(tmp_path):
    folder = _subject(tmp_path, n=3)
    (folder / "03.jpg").write_text("oops")
    with pytest.raises(DataError, match="03.jpg"):
        DreamBoothDataset(folder, token="sks", class_name="robot", resolution=16)


def test_decompression_bomb_refused_by_our_limit(tmp_path):
    path = _save(tmp_path / "big.png", size=(100, 100))
    with pytest.raises(DataError, match=r"big.png.*decompression bomb.*100x100.*limit of 1000"):
        load_image(path, max_pixels=1000)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(tmp_path):
    path = tmp_path / "bomb.png"  # 40000 x 40000 claimed in 57 bytes: never decoded
    path.write_bytes(_png_header_only(40000, 40000))
    with pytest.raises(DataError, match="bomb.png.*decompression bomb"):
        load_image(path)


def test_decompression_bomb_between_pillow_limits_is_refused(tmp_path, monkeypatch):
    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; load_image refuses it too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    path = _save(tmp_path / "warned.png", size=(20, 20))
    with pytest.raises(DataError, match="warned.png.*decompression bomb"):
        load_image(path)


# --------------------------------------------------------------------------- colour modes


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red everywhere ...
    arr[:4, :, 3] = 255  # ... opaque top half, fully transparent bottom half
    arr[4:, :, 3] = 0
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((0, 7)) == (255, 255, 255)


def test_half_transparent_pixel_blends_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(path)
    r, g, b = load_image(path).getpixel((0, 0))
    assert 125 <= r <= 129 and r == g == b


def test_la_transparent_pixel_becomes_white(tmp_path):
    img = Image.new("LA", (4, 4), (0, 255))
    img.putpixel((1, 1), (0, 0))
    path = tmp_path / "la.png"
    img.save(path)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 255, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    img.putpixel((2, 2), 0)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    out = load_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 255)
    assert out.getpixel((2, 2)) == (255, 255, 255)


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "p.gif"
    Image.new("RGB", (4, 4), (0, 128, 255)).convert("P").save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((0, 0))[2] > 200


def test_grayscale(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (4, 4), 77).save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink
    assert Image.open(path).mode == "CMYK"
    r, g, b = load_image(path).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32896, dtype=np.uint16)  # 128 * 257: mid grey
    arr[0, 0] = 65535
    arr[0, 1] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out.getpixel((2, 2)) == (128, 128, 128)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)


def test_multi_frame_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 3
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_multi_page_tiff_gives_first_page(tmp_path):
    pages = [Image.new("RGB", (8, 8), c) for c in [(10, 200, 30), (255, 0, 0)]]
    path = tmp_path / "pages.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert Image.open(path).n_frames == 2
    assert load_image(path).getpixel((4, 4)) == (10, 200, 30)


def test_mpo_gives_first_frame(tmp_path):
    Image.init()
    if "MPO" not in Image.SAVE_ALL:
        pytest.skip("this Pillow cannot write MPO files")
    frames = [Image.new("RGB", (16, 16), c) for c in [(0, 0, 255), (255, 255, 0)]]
    path = tmp_path / "camera.jpg"  # cameras name MPO files .jpg
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(path) as check:
        if check.format != "MPO" or getattr(check, "n_frames", 1) < 2:
            pytest.skip("Pillow did not write a multi-frame MPO")
    r, g, b = load_image(path).getpixel((8, 8))
    assert b > 200 and r < 40 and g < 40


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 3))  # the left edge is now the top
    assert r > 200 and g < 60 and b < 60


def _profile_bytes(profile) -> bytes:
    return ImageCms.ImageCmsProfile(profile).tobytes()


def test_icc_profile_srgb_loads_as_rgb(tmp_path):
    path = tmp_path / "srgb.jpg"
    _save(path, color=(180, 90, 40), icc_profile=_profile_bytes(ImageCms.createProfile("sRGB")))
    assert Image.open(path).info.get("icc_profile")
    out = load_image(path)
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 4 for a, b in zip(out.getpixel((5, 5)), (180, 90, 40), strict=True))


def _swapped_primaries_profile() -> bytes:
    """sRGB with its red and blue primaries swapped: a valid RGB profile that is not sRGB."""
    data = bytearray(_profile_bytes(ImageCms.createProfile("sRGB")))
    (count,) = struct.unpack(">I", data[128:132])
    table = {bytes(data[132 + 12 * i : 136 + 12 * i]): 136 + 12 * i for i in range(count)}
    red, blue = table[b"rXYZ"], table[b"bXYZ"]
    data[red : red + 8], data[blue : blue + 8] = data[blue : blue + 8], data[red : red + 8]
    return bytes(data)


def test_icc_profile_other_space_is_converted_to_srgb(tmp_path):
    # Pure "red" in a profile whose red primary is sRGB's blue must come out blue.
    path = tmp_path / "wide.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path, icc_profile=_swapped_primaries_profile())
    r, g, b = load_image(path).getpixel((1, 1))
    assert b > 200 and r < 40 and g < 40


def test_icc_profile_lab_image(tmp_path):
    path = tmp_path / "lab.tif"
    lab = _profile_bytes(ImageCms.createProfile("LAB", 5000))
    Image.new("LAB", (4, 4), (60, 150, 100)).save(path, icc_profile=lab)
    out = load_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((1, 1))
    assert r > g and b > g  # a* > 0 (red) and b* < 0 (blue): purple


def test_unusable_icc_profile_warns_and_still_loads(tmp_path):
    path = tmp_path / "badicc.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path, icc_profile=b"not a profile at all")
    with pytest.warns(UserWarning, match="badicc.png"):
        out = load_image(path)
    assert out.getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------- prepare_image


def test_prepare_image_shape_range_and_center_crop():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))  # white centre square
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # downscaling never warns
        t = prepare_image(img, 10)
    assert t.shape == (3, 10, 10) and t.dtype == torch.float32
    inner = t[:, :, 1:-1]  # the black sides are cropped away (edges blend a little)
    assert torch.allclose(inner, torch.ones_like(inner), atol=0.05) and t.mean() > 0.9
    assert prepare_image(Image.new("RGB", (8, 8), (0, 0, 0)), 8).min() == -1.0


def test_prepare_image_flip_and_random_crop_are_deterministic():
    arr = np.arange(32 * 48 * 3, dtype=np.uint32).reshape(32, 48, 3) % 251
    img = Image.fromarray(arr.astype(np.uint8))
    a = prepare_image(img, 32, center_crop=False, rng=random.Random(7))
    b = prepare_image(img, 32, center_crop=False, rng=random.Random(7))
    assert torch.equal(a, b)
    flipped = prepare_image(img, 32, center_crop=False, flip=True, rng=random.Random(7))
    assert torch.equal(flipped, a.flip(-1))
    crops = {prepare_image(img, 32, center_crop=False, rng=random.Random(s))[0, 0, 0].item()
             for s in range(20)}  # fmt: skip
    assert len(crops) > 1


def test_small_image_is_upscaled_with_a_warning_naming_it():
    img = Image.new("RGB", (12, 16), (10, 20, 30))
    with pytest.warns(UserWarning, match=r"upscaling tiny.png \(12x16\) to 64"):
        t = prepare_image(img, 64, source="tiny.png")
    assert t.shape == (3, 64, 64)


def test_dataset_warns_about_small_instance_images(tmp_path):
    folder = _subject(tmp_path, n=2, size=(8, 8))
    with pytest.warns(UserWarning, match="upscaling") as record:
        DreamBoothDataset(folder, token="sks", class_name="robot", resolution=16)
    assert "00.png (8x8)" in _messages(record) and "01.png (8x8)" in _messages(record)


# --------------------------------------------------------------------------- captions


def test_instance_and_class_prompts():
    assert instance_prompt("sks", "dog") == "a photo of sks dog"
    assert class_prompt("stuffed  animal") == "a photo of stuffed animal"
    with pytest.raises(DataError, match="--class-name"):
        instance_prompt("sks", None)
    with pytest.raises(DataError, match="--class-name"):
        instance_prompt("sks", "  ")
    with pytest.raises(DataError, match="--token"):
        instance_prompt("", "dog")


def test_caption_txt_overrides_the_prompt(tmp_path):
    folder = _subject(tmp_path, n=3)
    (folder / "01.txt").write_text("  a photo of sks robot\nwaving  \n", encoding="utf-8")
    (folder / "02.txt").write_text("  \n")
    with pytest.warns(UserWarning, match="02.txt is empty"):
        ds = DreamBoothDataset(folder, token="sks", class_name="robot", resolution=16)
    assert ds.instance_prompts == [
        "a photo of sks robot",
        "a photo of sks robot waving",
        "a photo of sks robot",
    ]
    assert ds[1]["instance_prompt"] == "a photo of sks robot waving"
    assert caption_for(folder / "00.png", "default") == "default"


def test_dataset_without_class_name_asks_for_it(tmp_path):
    folder = _subject(tmp_path, n=3)
    with pytest.raises(DataError, match="--class-name"):
        DreamBoothDataset(folder, token="sks", class_name=None, resolution=16)


# --------------------------------------------------------------------------- dataset


def _dataset(tmp_path, **kw) -> DreamBoothDataset:
    inst = tmp_path / "inst"
    inst.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(inst / f"{i}.png")
    cls = tmp_path / "cls"
    cls.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    args = dict(token="sks", class_name="robot", resolution=16, class_images=cls,
                center_crop=False, hflip_prob=0.5, seed=3)  # fmt: skip
    args.update(kw)
    return DreamBoothDataset(inst, **args)


def test_dataset_items_and_length(tmp_path):
    ds = _dataset(tmp_path)
    assert len(ds) == 5  # max(3 instance, 5 class)
    item = ds[4]
    assert item["instance_pixels"].shape == (3, 16, 16)
    assert item["class_pixels"].shape == (3, 16, 16)
    assert item["instance_prompt"] == "a photo of sks robot"
    assert item["class_prompt"] == "a photo of robot"
    assert ds.with_prior
    with pytest.raises(IndexError):
        ds[5]


def test_dataset_without_class_images(tmp_path):
    ds = _dataset(tmp_path, class_images=None)
    assert len(ds) == 3 and not ds.with_prior
    assert set(ds[0]) == {"instance_pixels", "instance_prompt", "instance_size"}


def test_dataset_is_deterministic_per_seed_epoch_index(tmp_path):
    ds = _dataset(tmp_path)
    random.seed(123)
    torch.manual_seed(123)
    first = [ds[i] for i in range(len(ds))]
    # Global RNG state does not matter; item order does not matter.
    random.seed(999)
    torch.manual_seed(999)
    again = [ds[i] for i in reversed(range(len(ds)))][::-1]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["instance_pixels"], b["instance_pixels"])
        assert torch.equal(a["class_pixels"], b["class_pixels"])
    # A fresh dataset (a resumed run, another process) with the same seed and epoch agrees.
    (tmp_path / "again").mkdir()
    other = _dataset(tmp_path / "again")  # same pixels on disk, new object
    other.set_epoch(0)
    assert torch.equal(other[2]["instance_pixels"], first[2]["instance_pixels"])
    # Another epoch or seed changes the augmentation of some item.
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["instance_pixels"], first[i]["instance_pixels"])
               for i in range(len(ds)))  # fmt: skip
    ds.set_epoch(0)
    assert torch.equal(ds[1]["instance_pixels"], first[1]["instance_pixels"])
    ds.seed = 4
    assert any(not torch.equal(ds[i]["instance_pixels"], first[i]["instance_pixels"])
               for i in range(len(ds)))  # fmt: skip


def test_class_folder_errors_name_it_and_allow_one_image(tmp_path):
    inst = _subject(tmp_path, n=3)
    with pytest.raises(DataError, match="class-image folder .*nocls does not exist"):
        DreamBoothDataset(
            inst, token="sks", class_name="robot", resolution=8, class_images=tmp_path / "nocls"
        )
    cls = tmp_path / "cls"
    cls.mkdir()
    _save(cls / "0.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one class image is unusual but not a subject problem
        ds = DreamBoothDataset(
            inst, token="sks", class_name="robot", resolution=8, class_images=cls
        )
    assert len(ds) == 3 and ds.with_prior


def test_collate_orders_instance_then_class_with_prior_mask(tmp_path):
    ds = _dataset(tmp_path)
    examples = [ds[0], ds[1]]
    batch = collate_dreambooth(examples, with_prior=True)
    assert batch["pixels"].shape == (4, 3, 16, 16)
    assert batch["prompts"] == ["a photo of sks robot"] * 2 + ["a photo of robot"] * 2
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert torch.equal(batch["pixels"][1], examples[1]["instance_pixels"])
    assert torch.equal(batch["pixels"][2], examples[0]["class_pixels"])
    plain = collate_dreambooth(examples, with_prior=False)
    assert plain["pixels"].shape == (2, 3, 16, 16) and not plain["is_prior"].any()


def test_collate_with_prior_needs_class_images(tmp_path):
    ds = _dataset(tmp_path, class_images=None)
    with pytest.raises(ValueError, match="class images"):
        collate_dreambooth([ds[0]], with_prior=True)


def test_dataloader_with_workers_matches_in_process(tmp_path):
    ds = _dataset(tmp_path)
    ds.set_epoch(2)
    collate = lambda ex: collate_dreambooth(ex, with_prior=True)  # noqa: E731
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1, collate_fn=collate)
    (batch,) = list(loader)
    expected = collate([ds[i] for i in range(5)])
    assert torch.equal(batch["pixels"], expected["pixels"])


# --------------------------------------------------------------------------- class-image cache


def test_class_image_cache_dir_is_stable_and_keyed(tmp_path, monkeypatch):
    monkeypatch.delenv("SDATOM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = class_image_cache_dir("runwayml/sd15", "a photo of dog", 100, 512)
    assert a.parent == tmp_path / "cache" / "sdatom" / "class_images"
    assert a == class_image_cache_dir("runwayml/sd15", "a photo of dog", 200, 512)
    assert a != class_image_cache_dir("runwayml/sd15", "a photo of cat", 100, 512)
    assert a != class_image_cache_dir("runwayml/sd15", "a photo of dog", 100, 768)
    assert a != class_image_cache_dir("other/model", "a photo of dog", 100, 512)
    # images made with other denoising steps or precision are other images
    steps30 = class_image_cache_dir("runwayml/sd15", "a photo of dog", 100, 512, steps=30)
    assert steps30 != class_image_cache_dir("runwayml/sd15", "a photo of dog", 100, 512, steps=4)
    assert steps30 != class_image_cache_dir(
        "runwayml/sd15", "a photo of dog", 100, 512, steps=30, precision="fp16"
    )
    # retrained weights under the same name are another model
    assert steps30 != class_image_cache_dir(
        "runwayml/sd15", "a photo of dog", 100, 512, steps=30, weights="abc"
    )
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = class_image_cache_dir("runwayml/sd15", "a photo of dog", 100, 512)
    assert home.parent == tmp_path / "home" / ".cache" / "sdatom" / "class_images"
    monkeypatch.setenv("SDATOM_CACHE", str(tmp_path / "mine"))
    mine = class_image_cache_dir("runwayml/sd15", "a photo of dog", 100, 512)
    assert mine.parent == tmp_path / "mine" / "class_images"
    with pytest.raises(DataError):
        class_image_cache_dir("m", "p", 0, 512)


def test_list_cached_class_images_counts_complete_pngs_only(tmp_path):
    from sdatom.fileio import atomic_path

    cache = tmp_path / "cls"
    assert list_cached_class_images(cache, 1) is None  # no folder yet
    for i in range(2):
        with atomic_path(class_image_path(cache, i)) as tmp:
            Image.new("RGB", (4, 4)).save(tmp, format="PNG")
    (cache / ".00002.png.abc.tmp").write_bytes(b"\x89PNG half")  # writer died mid-file
    (cache / "00003.png.tmp").write_bytes(b"\x89PNG half")
    assert list_cached_class_images(cache, 3) is None
    got = list_cached_class_images(cache, 2)
    assert [p.name for p in got] == ["00000.png", "00001.png"]
    assert [p.name for p in list_cached_class_images(cache, 1)] == ["00000.png"]


# --------------------------------------------------------------------------- real data


def test_demo_subject_loads():
    folder = REPO / "data" / "toy"
    if not folder.is_dir():
        pytest.skip("data/toy is missing: run scripts/make_demo_subject.py")
    images = find_images(folder)
    assert 4 <= len(images) <= 5
    assert sum(p.stat().st_size for p in images) < 200_000
    for p in images:
        assert load_image(p).mode == "RGB"


def test_dreambench_subject_loads():
    dreambench = _shared_dreambench()
    if not (dreambench / "dog").is_dir():
        pytest.skip(f"DreamBench is not available at {dreambench} (set SDATOM_SHARED)")
    ds = DreamBoothDataset(dreambench / "dog", token="sks", class_name="dog", resolution=32)
    assert len(ds) >= 3
    assert ds[0]["instance_pixels"].shape == (3, 32, 32)


def test_weights_fingerprint_changes_when_a_local_model_is_retrained(tmp_path):
    from sdatom.models import weights_fingerprint

    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"a" * 5000)
    first = weights_fingerprint(str(tmp_path / "model"))
    assert first is not None and first == weights_fingerprint(str(tmp_path / "model"))
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"b" * 5000)
    assert weights_fingerprint(str(tmp_path / "model")) != first
    assert weights_fingerprint("some/hub-id") is None and weights_fingerprint("tiny") is None


def test_class_images_in_batches_draw_what_single_images_do(tiny_pipe, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sdatom.data import class_images

    tiny_pipe.set_progress_bar_config(disable=True)
    accelerator = SimpleNamespace(
        process_index=0,
        num_processes=1,
        device=torch.device("cpu"),
        mixed_precision="no",
        is_local_main_process=True,
        wait_for_everyone=lambda: None,
    )
    config = SimpleNamespace(
        prior=True,
        class_dir=None,
        class_name="dog",
        model="tiny",
        num_class_images=5,
        resolution=32,
        class_sample_steps=2,
        class_batch_size=1,
    )

    def pixels(paths):
        return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]

    monkeypatch.setenv("SDATOM_CACHE", str(tmp_path / "single"))
    single = pixels(class_images(config, tiny_pipe, accelerator, progress=False))
    monkeypatch.setenv("SDATOM_CACHE", str(tmp_path / "batched"))
    config.class_batch_size = 2
    paths = class_images(config, tiny_pipe, accelerator, progress=False)
    assert len(paths) == 5
    # Each image keeps its own seed: batching may move a pixel by one level of 255, no more.
    for a, b in zip(single, pixels(paths), strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
    assert len({a.tobytes() for a in single}) == 5  # the seeds differ, so do the images
    # A cache with holes is topped up, the images already there are kept.
    kept = paths[0].stat().st_mtime_ns
    paths[3].unlink()
    again = class_images(config, tiny_pipe, accelerator, progress=False)
    assert again == paths and paths[0].stat().st_mtime_ns == kept
    assert np.abs(pixels([paths[3]])[0] - single[3]).max() <= 1
