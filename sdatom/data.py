"""Subject folders, robust image loading, captions, the DreamBooth dataset, class images
(generated once and cached), the resumable data order and the encoder cache.

A subject folder holds a few photos of one subject (DreamBooth usually uses 3-5), optionally
with a caption ``.txt`` beside an image (same stem) that replaces the default prompt
``"a photo of {token} {class_name}"`` for that image.

Listing (:func:`find_images`) only looks at file names; decoding (:func:`load_image`) is where a
broken file is found. :class:`DreamBoothDataset` decodes every instance image when it is built,
so a broken photo in the subject folder is an error before training starts, never skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from sdatom.errors import DataError
from sdatom.fileio import atomic_path
from sdatom.prompts import token_pattern
from sdatom.token_embedding import expand

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "DreamBoothDataset",
    "Encoders",
    "EpochSampler",
    "caption_for",
    "class_image_cache_dir",
    "class_image_path",
    "class_image_precision",
    "class_images",
    "class_prompt",
    "collate_dreambooth",
    "find_images",
    "instance_prompt",
    "list_cached_class_images",
    "load_image",
    "prepare_image",
]

#: File name suffixes (lower case) treated as images. ``.mpo`` is what some cameras write;
#: most MPO files are named ``.jpg`` and are handled the same way.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo"}
)

#: Largest image (width x height) :func:`load_image` decodes: 8192 x 8192 = 64 MP, about 200 MB
#: as RGB. Larger files are refused as possible decompression bombs; downscale them first.
MAX_IMAGE_PIXELS = 8192 * 8192

CAPTION_SUFFIX = ".txt"

_ALPHA_MODES = {"RGBA": "RGB", "LA": "L", "PA": "RGB", "RGBa": "RGB", "La": "L"}
_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- listing


def find_images(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Return the image files of a subject folder, sorted by path.

    Images are recognised by suffix (:data:`IMAGE_EXTENSIONS`, any case); files are not
    opened here, so a corrupt image is reported later by :func:`load_image`. Other files are
    skipped with one warning naming them, except caption ``.txt`` files beside an image and
    hidden files (``.DS_Store``, ``.*.tmp``), which are skipped silently.

    Nested folders are ignored with a warning naming them, unless ``recursive=True``, in which
    case their images are included (hidden folders are always ignored).

    Raises:
        DataError: the folder is missing, is not a folder, or holds no images.
    """
    return _find_images(Path(folder), recursive=recursive, subject=True)


def _find_images(root: Path, *, recursive: bool, subject: bool) -> list[Path]:
    what = "subject folder" if subject else "class-image folder"
    hint = "add 3-5 photos of the subject" if subject else "add class images or remove it"
    if not root.exists():
        raise DataError(f"{what} {root} does not exist: pass an existing folder of images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass the {what} that holds the images")

    images: list[Path] = []
    others: list[Path] = []
    subdirs: list[Path] = []
    candidates = root.rglob("*") if recursive else root.iterdir()
    for path in candidates:
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_dir():
            if not recursive:
                subdirs.append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            others.append(path)

    images.sort()
    stems = {p.with_suffix("") for p in images}
    others = sorted(
        p for p in others if not (p.suffix.lower() == CAPTION_SUFFIX and p.with_suffix("") in stems)
    )
    if subdirs:
        names = ", ".join(p.name for p in sorted(subdirs))
        warnings.warn(
            f"ignoring nested folder(s) in {root}: {names} (their images are not used; move "
            "them up into the folder, or call find_images with recursive=True)",
            stacklevel=3,
        )
    if others:
        names = ", ".join(str(p.relative_to(root)) for p in others)
        warnings.warn(
            f"skipping non-image file(s) in {root}: {names} "
            f"(images must be one of {', '.join(sorted(IMAGE_EXTENSIONS))})",
            stacklevel=3,
        )
    if not images:
        if not subdirs and not others:
            raise DataError(f"{what} {root} is empty: {hint}")
        raise DataError(f"{what} {root} holds no images (.jpg, .png, .webp, ...): {hint}")
    if subject and len(images) == 1:
        warnings.warn(
            f"subject folder {root} holds a single image; DreamBooth usually uses 3-5 photos",
            stacklevel=3,
        )
    return images


# --------------------------------------------------------------------------- loading


def load_image(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file into an upright 8-bit sRGB ``RGB`` image.

    - EXIF orientation is applied (the photo is rotated upright).
    - Multi-frame files (GIF, TIFF, MPO) give their first frame.
    - 16-bit images are scaled to 8 bits (65535 -> 255), not clipped.
    - An embedded ICC profile is converted to sRGB; grayscale and CMYK become RGB.
    - Transparency (RGBA, LA, palette or colour-key transparency) is composited on white.
    - Images over ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`, 64 MP) are refused before
      decoding, as are files Pillow itself flags as decompression bombs.

    Raises:
        DataError: the file is missing, empty, not an image, truncated or too large.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image file")
    if size == 0:
        raise DataError(f"image {path} is empty (0 bytes): delete it or replace it with a photo")

    with warnings.catch_warnings():
        # Pillow warns (rather than raises) between 1x and 2x its own limit: refuse both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                _check_pixels(img, path, max_pixels)
                img.seek(0)
                img.load()
                icc = img.info.get("icc_profile")
                img = _exif_upright(img, path)
                return _to_srgb(img, icc, path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(
                f"image {path} is refused as a possible decompression bomb ({err}); "
                "downscale it below 64 megapixels"
            ) from None
        except UnidentifiedImageError:
            raise DataError(
                f"{path} is not an image Pillow can read: convert it to JPEG or PNG, or remove it"
            ) from None
        except (OSError, SyntaxError, ValueError) as err:
            # Truncated or corrupt data: "image file is truncated", "broken data stream", ...
            raise DataError(
                f"image {path} is corrupt or truncated ({err}): re-export it or remove it"
            ) from None


def _check_pixels(img: Image.Image, path: Path, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise DataError(
            f"image {path} is refused as a possible decompression bomb: {width}x{height} = "
            f"{width * height} pixels is over the limit of {max_pixels}; downscale it first"
        )


def _exif_upright(img: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"ignoring unreadable EXIF orientation of {path} ({err})", stacklevel=3)
        return img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit (``I;16*``, ``I``) or float (``F``) grayscale -> 8-bit ``L`` by scaling."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr
    else:
        arr = arr.astype(np.float64)
        # PNG/TIFF 16-bit data arrives as I;16 or I with values 0..65535; 32-bit ints beyond
        # that range are scaled by their maximum instead.
        peak = float(arr.max()) if arr.size else 0.0
        arr = arr * (255.0 / peak) if peak > 65535 else arr / 257.0
    arr = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _icc_to_srgb(img: Image.Image, icc: bytes, path: Path) -> Image.Image:
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as err:
        warnings.warn(
            f"ignoring the ICC colour profile of {path} ({err}); colours may be slightly off",
            stacklevel=4,
        )
        return img
    assert out is not None  # profileToProfile returns None only with inPlace=True
    return out


def _to_srgb(img: Image.Image, icc: bytes | None, path: Path) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("RGBa", "La", "PA") or (
        img.mode in ("L", "RGB", "1") and "transparency" in img.info
    ):
        img = img.convert("RGBA")

    alpha = None
    if img.mode in _ALPHA_MODES:
        alpha = img.getchannel("A")
        img = img.convert(_ALPHA_MODES[img.mode])

    if icc and img.mode in ("L", "RGB", "CMYK", "LAB"):
        img = _icc_to_srgb(img, icc, path)
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError:
            raise DataError(
                f"image {path} has colour mode {img.mode} that cannot be converted to RGB: "
                "re-export it as an sRGB JPEG or PNG"
            ) from None

    if alpha is not None:
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=alpha)
        img = background
    return img


# --------------------------------------------------------------------------- tensors


def _resize_shorter_side(
    img: Image.Image, resolution: int, source: str | os.PathLike | None
) -> Image.Image:
    width, height = img.size
    shorter = min(width, height)
    if shorter == resolution:
        return img
    if shorter < resolution:
        name = str(source) if source is not None else f"an image of {width}x{height}"
        warnings.warn(
            f"upscaling {name} ({width}x{height}) to {resolution} px: it is smaller than the "
            "training resolution, so results may be blurry; use larger photos",
            stacklevel=3,
        )
    scale = resolution / shorter
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def prepare_image(
    img: Image.Image,
    resolution: int,
    *,
    center_crop: bool = True,
    flip: bool = False,
    rng: random.Random | None = None,
    source: str | os.PathLike | None = None,
    return_crop: bool = False,
):
    """Resize, crop and normalise an RGB image into a ``(3, resolution, resolution)`` tensor.

    The shorter side is resized to ``resolution`` (bicubic; upscaling warns, naming ``source``
    when given), then a square is cropped from the centre, or at a position drawn from ``rng``
    when ``center_crop`` is False (``rng=None`` means ``random.Random(0)``, so the result is
    always deterministic). ``flip`` mirrors the result horizontally. Values are in [-1, 1].
    With ``return_crop``, also returns the crop's (top, left) corner in the resized image as
    seen after the flip (what SDXL's size conditioning records).

    Written with PIL rather than torchvision's transforms: the crop corner must be known (SDXL)
    and drawn from the item's own ``rng`` (exact resume and multi-process), where
    ``RandomCrop`` draws from torch's global generator and reports no corner.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    img = _resize_shorter_side(img.convert("RGB"), resolution, source)
    width, height = img.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        rng = rng if rng is not None else random.Random(0)
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    pixels = pixels.float().div(127.5).sub(1.0).contiguous()
    if not return_crop:
        return pixels
    return pixels, (top, width - left - resolution if flip else left)


# --------------------------------------------------------------------------- prompts


def instance_prompt(token: str, class_name: str | None) -> str:
    """Default instance prompt: ``"a photo of {token} {class_name}"``.

    Raises:
        DataError: ``token`` or ``class_name`` is missing (the class is never guessed).
    """
    if not token or not token.strip():
        raise DataError("the subject token is empty: pass --token, e.g. --token sks")
    return f"a photo of {token.strip()} {_require_class(class_name)}"


def class_prompt(class_name: str | None) -> str:
    """Prior-preservation prompt: ``"a photo of {class_name}"``."""
    return f"a photo of {_require_class(class_name)}"


def _require_class(class_name: str | None) -> str:
    if class_name is None or not class_name.strip():
        raise DataError(
            "the subject's class is missing: pass --class-name (e.g. --class-name dog); "
            "it is never guessed"
        )
    return " ".join(class_name.split())


def caption_for(image: str | os.PathLike, default: str) -> str:
    """The caption of ``image``: its sibling ``<stem>.txt`` (stripped) if any, else ``default``.

    An empty caption file falls back to ``default`` with a warning naming it.
    """
    image = Path(image)
    caption_path = image.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return default
    try:
        text = caption_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"caption file {caption_path} is not UTF-8 text: re-save it") from None
    text = " ".join(text.split())
    if not text:
        warnings.warn(
            f"caption file {caption_path} is empty; using the default prompt {default!r}",
            stacklevel=2,
        )
        return default
    return text


# --------------------------------------------------------------------------- dataset


def _as_image_list(
    images: str | os.PathLike | Sequence[str | os.PathLike], *, recursive: bool, subject: bool
) -> list[Path]:
    if isinstance(images, (str, os.PathLike)):
        return _find_images(Path(images), recursive=recursive, subject=subject)
    paths = [Path(p) for p in images]
    if not paths:
        what = "instance" if subject else "class"
        raise DataError(f"an empty list of {what} images was given: pass a folder or files")
    return paths


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with their prompts, plus optional class (prior-preservation) images.

    Item ``i`` pairs instance image ``i % n_instance`` with class image ``i % n_class``; the
    length is ``max(n_instance, n_class)`` (as in diffusers' train_dreambooth). Each item is a
    dict with ``instance_pixels`` (3,H,W in [-1,1]) and ``instance_prompt``, plus
    ``class_pixels`` and ``class_prompt`` when class images are given.

    Augmentation (random crop when ``center_crop`` is False, horizontal flip with probability
    ``hflip_prob``) draws from an RNG derived from ``(seed, epoch, index)`` only, never global
    state, so resumed and multi-process runs see the same pixels. Call :meth:`set_epoch` each
    epoch; with DataLoader workers use ``persistent_workers=False`` so the workers see it.

    Instance images are decoded, checked and resized once when the dataset is built (a broken
    photo is a :class:`~sdatom.errors.DataError` then); class images are loaded per item.
    """

    def __init__(
        self,
        instance_images: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        token: str,
        class_name: str | None,
        resolution: int = 512,
        class_images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        center_crop: bool = True,
        hflip_prob: float = 0.0,
        seed: int = 0,
        recursive: bool = False,
    ) -> None:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        default_prompt = instance_prompt(token, class_name)
        self.resolution = resolution
        self.center_crop = center_crop
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.epoch = 0

        self.instance_paths = _as_image_list(instance_images, recursive=recursive, subject=True)
        self.instance_prompts = [caption_for(p, default_prompt) for p in self.instance_paths]
        loaded = [load_image(p) for p in self.instance_paths]
        #: (height, width) of each instance photo before resizing (SDXL's size ids).
        self.instance_sizes = [(img.height, img.width) for img in loaded]
        self._instance_images = [
            _resize_shorter_side(img, resolution, p)
            for img, p in zip(loaded, self.instance_paths, strict=True)
        ]

        self.class_paths: list[Path] = []
        self.class_prompt: str | None = None
        if class_images is not None:
            self.class_paths = _as_image_list(class_images, recursive=False, subject=False)
            self.class_prompt = class_prompt(class_name)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation the next items use."""
        self.epoch = int(epoch)

    @property
    def with_prior(self) -> bool:
        """Whether class images (prior preservation) are present."""
        return bool(self.class_paths)

    def __len__(self) -> int:
        return max(len(self.instance_paths), len(self.class_paths))

    def _rng(self, index: int) -> random.Random:
        # Seeding with a str hashes it with SHA-512: stable across processes and Python runs.
        return random.Random(f"sdatom-data:{self.seed}:{self.epoch}:{index}")

    def _augment(
        self, img: Image.Image, rng: random.Random, source: Path, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels, and (original h, w, crop top, left) of the crop actually taken."""
        flip = rng.random() < self.hflip_prob
        pixels, (top, left) = prepare_image(
            img,
            self.resolution,
            center_crop=self.center_crop,
            flip=flip,
            rng=rng,
            source=source,
            return_crop=True,
        )
        return pixels, torch.tensor([size[0], size[1], top, left])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        rng = self._rng(index)
        i = index % len(self.instance_paths)
        pixels, size = self._augment(
            self._instance_images[i], rng, self.instance_paths[i], self.instance_sizes[i]
        )
        item: dict = {
            "instance_pixels": pixels,
            "instance_prompt": self.instance_prompts[i],
            "instance_size": size,
        }
        if self.class_paths:
            c = index % len(self.class_paths)
            path = self.class_paths[c]
            img = load_image(path)
            item["class_pixels"], item["class_size"] = self._augment(
                img, rng, path, (img.height, img.width)
            )
            item["class_prompt"] = self.class_prompt
        return item


def collate_dreambooth(examples: Sequence[dict], with_prior: bool) -> dict:
    """Stack a batch: instance rows first, then (with prior preservation) class rows.

    Returns ``{"pixels": (B,3,H,W) float tensor, "prompts": list[str],
    "is_prior": (B,) bool tensor, "sizes": (B,4) long tensor}`` where ``is_prior`` marks the
    class rows, as diffusers' collate does (it later splits the batch in two halves for the
    prior loss), and ``sizes`` holds each row's own original size and crop corner (SDXL).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    pixels = [ex["instance_pixels"] for ex in examples]
    prompts = [ex["instance_prompt"] for ex in examples]
    sizes = [ex["instance_size"] for ex in examples]
    n_prior = 0
    if with_prior:
        if any("class_pixels" not in ex for ex in examples):
            raise ValueError("with_prior=True but the examples hold no class images")
        pixels += [ex["class_pixels"] for ex in examples]
        prompts += [ex["class_prompt"] for ex in examples]
        sizes += [ex["class_size"] for ex in examples]
        n_prior = len(examples)
    stacked = torch.stack(pixels).to(memory_format=torch.contiguous_format).float()
    is_prior = torch.zeros(len(pixels), dtype=torch.bool)
    if n_prior:
        is_prior[len(examples) :] = True
    return {
        "pixels": stacked,
        "prompts": prompts,
        "is_prior": is_prior,
        "sizes": torch.stack(sizes),
    }


# --------------------------------------------------------------------------- class images


def _cache_root() -> Path:
    from sdatom.fileio import cache_dir

    return cache_dir() / "class_images"


def class_image_cache_dir(
    model_id: str,
    class_prompt: str,
    count: int,
    resolution: int,
    *,
    steps: int | None = None,
    precision: str = "fp32",
    weights: str | None = None,
) -> Path:
    """Folder where the class images for (model, prompt, resolution, denoising ``steps``,
    ``precision``) are cached. ``weights`` is a fingerprint of the model's UNet weights where
    one can be taken (a local folder, ``toy``): retrained weights at the same path or name
    never reuse images of the old ones.

    ``<sdatom cache>/class_images/<hash>`` (``$SDATOM_CACHE``, else
    ``$XDG_CACHE_HOME/sdatom`` or ``~/.cache/sdatom``). ``count`` is
    checked but is not part of the key: asking for more images later tops up the same folder.
    The folder is not created here.
    """
    if count <= 0:
        raise DataError(f"the number of class images must be positive, got {count}")
    if resolution <= 0:
        raise DataError(f"the class-image resolution must be positive, got {resolution}")
    key = json.dumps(
        {
            "v": 2,
            "model": str(model_id),
            "prompt": class_prompt,
            "resolution": int(resolution),
            "steps": steps,
            "precision": precision,
            **({"weights": weights} if weights else {}),
        },
        sort_keys=True,
    )
    return _cache_root() / hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def class_image_path(cache_dir: str | os.PathLike, index: int) -> Path:
    """Where class image ``index`` goes (``00042.png``). Write it atomically, for example
    with :func:`sdatom.fileio.atomic_path`, whose temporary ``.*.tmp`` file never counts."""
    return Path(cache_dir) / f"{index:05d}.png"


def list_cached_class_images(cache_dir: str | os.PathLike, count: int) -> list[Path] | None:
    """The first ``count`` complete class images in ``cache_dir``, or None if there are fewer.

    Only visible ``*.png`` files count; temporary (``.tmp``) and hidden files are ignored, so a
    half-written image (which the writer keeps under a temporary name) never counts.
    """
    folder = Path(cache_dir)
    if not folder.is_dir():
        return None
    done = sorted(
        p
        for p in folder.iterdir()
        if p.suffix == ".png" and not p.name.startswith(".") and p.is_file()
    )
    if len(done) < count:
        return None
    return done[:count]


# ----------------------------------------------------------------------------- class images


def class_image_precision(accelerator: Any) -> str:
    """The precision class images are generated in: the training precision on GPUs (fast, and
    the images the model is later regularised towards), fp32 on the CPU."""
    if accelerator.device.type == "cuda" and accelerator.mixed_precision in ("fp16", "bf16"):
        return accelerator.mixed_precision
    return "fp32"


def class_images(
    config: Any, pipe: Any, accelerator: Any, progress: bool = True
) -> list[Path] | None:
    """Class images for prior preservation: the user's folder, or generated once and cached.

    Generation is split across processes (image i on process i % N), so no process waits on
    another for long; each image is written atomically, so a killed run never leaves a
    half-written image that later counts. The cache key holds the model, prompt, resolution,
    denoising steps and precision.
    """
    from sdatom.progress import progress_bar

    c = config  # resolved: num_class_images, class_sample_steps and resolution are set
    if not c.prior:
        return None
    if c.class_dir:
        return find_images(c.class_dir)[: c.num_class_images]
    from sdatom.models import weights_fingerprint

    prompt = class_prompt(c.class_name)
    precision = class_image_precision(accelerator)
    folder = class_image_cache_dir(
        c.model,
        prompt,
        c.num_class_images,
        c.resolution,
        steps=c.class_sample_steps,
        precision=precision,
        weights=weights_fingerprint(c.model),
    )
    cached = list_cached_class_images(folder, c.num_class_images)
    if cached is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    logger.info("generating %d class images for %r", c.num_class_images, prompt)
    mine = [i for i in range(rank, c.num_class_images, world)]
    bar = progress_bar(
        len(mine),
        "class images",
        enabled=progress and accelerator.is_local_main_process,
        unit="img",
    )
    autocast = accelerator.autocast() if precision != "fp32" else contextlib.nullcontext()
    bar.update(sum(class_image_path(folder, i).is_file() for i in mine))
    todo = [i for i in mine if not class_image_path(folder, i).is_file()]
    # Batched as diffusers' DreamBooth script does; image i keeps its own generator seeded i,
    # so a batch draws what single images would (to one level of 255 in a pixel).
    for start in range(0, len(todo), c.class_batch_size):
        batch = todo[start : start + c.class_batch_size]
        with autocast:
            images = pipe(
                [prompt] * len(batch),
                num_inference_steps=c.class_sample_steps,
                height=c.resolution,
                width=c.resolution,
                generator=[torch.Generator(device="cpu").manual_seed(i) for i in batch],
            ).images
        for i, image in zip(batch, images, strict=True):
            with atomic_path(class_image_path(folder, i)) as tmp:
                image.save(tmp, format="PNG")
        bar.update(len(batch))
    bar.close()
    accelerator.wait_for_everyone()
    return list_cached_class_images(folder, c.num_class_images)


# ----------------------------------------------------------------------------- order and encoding


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled order that depends only on (seed, epoch): resumable and the same on every
    process, which lets accelerate shard it."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class Encoders:
    """The frozen VAE and text encoders, with caches: each image and prompt is encoded once.

    What the prompts become (one text encoder's hidden states, or SDXL's two plus a pooled
    embedding and size ids) is the model family's business (:mod:`sdatom.families`).
    """

    def __init__(
        self,
        pipe: Any,
        device: torch.device,
        cache: bool,
        live_token: str | None = None,
        token_vectors: int = 1,
    ):
        from sdatom.families import family_of

        self.pipe, self.family = pipe, family_of(pipe)
        self.vae = pipe.vae  # images go in in the VAE's own dtype (SDXL's may stay fp32)
        self.device, self.cache = device, cache
        # Prompts holding this token are encoded at every step, with gradients (its embedding
        # is being trained, :mod:`sdatom.token_embedding`), the token written once per vector;
        # the others once.
        self.live_token, self.token_vectors = live_token, token_vectors
        self.live = token_pattern(live_token) if live_token else None
        self._latents: dict[str, torch.Tensor] = {}
        self._prompts: dict[str, Any] = {}

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 2·C, h, w): the VAE posterior's mean and log-variance of each image."""
        out = []
        for image in pixels:
            key = hashlib.sha1(image.numpy().tobytes()).hexdigest() if self.cache else None
            if key is None or key not in self._latents:
                x = image[None].to(self.device, self.vae.dtype)
                moments = self.vae.encode(x).latent_dist.parameters.float()
                if key is None:
                    out.append(moments)
                    continue
                self._latents[key] = moments
            out.append(self._latents[key])
        return torch.cat(out)

    def conditioning(self, prompts: list[str]):
        """The family's :class:`~sdatom.families.Conditioning` of ``prompts``, one row each."""
        from sdatom.families import Conditioning

        live = {p for p in prompts if self.live is not None and self.live.search(p)}
        with torch.no_grad():
            for p in set(prompts) - self._prompts.keys() - live:
                self._prompts[p] = self.family.encode_prompts(self.pipe, [p], self.device)
        fresh = {
            p: self.family.encode_prompts(
                self.pipe, [expand(p, self.live_token, self.token_vectors)], self.device
            )
            for p in live
        }
        return Conditioning.cat([fresh[p] if p in fresh else self._prompts[p] for p in prompts])

    def prompts(self, prompts: list[str]) -> torch.Tensor:
        """The text encoders' hidden states for ``prompts`` (the UNet's cross-attention input)."""
        return self.conditioning(prompts).hidden

    def unet_kwargs(
        self, prompts: list[str], sizes: torch.Tensor, resolution: int
    ) -> dict[str, Any]:
        """Keyword arguments of the UNet for a batch: its conditioning, per row."""
        return self.family.unet_kwargs(self.conditioning(prompts), sizes, resolution)
