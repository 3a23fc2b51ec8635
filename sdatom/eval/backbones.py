"""The networks the metrics embed images with: CLIP (open_clip), DINO ViT-S/16, LPIPS.

Pretrained weights are found without touching the network when ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) is set: a missing checkpoint is then a :class:`UsageError` at once,
naming the option that supplies a local file. ``random=True`` builds every backbone with
seeded random weights, for smoke tests of the evaluation code only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T

from sdatom.errors import UsageError, one_line
from sdatom.eval.common import RANDOM_WARNING
from sdatom.models import hub_offline

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "DEFAULT_DINO",
    "RANDOM_WARNING",
    "Backbones",
    "load_backbones",
]

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
DEFAULT_DINO = "facebook/dino-vits16"

_RANDOM_SEED = 0
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# facebook/dino-vits16 (ViT-S/16): used when building random weights or loading a bare
# .safetensors file that has no config.json beside it.
_DINO_VITS16 = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=16,
    image_size=224,
    qkv_bias=True,
    layer_norm_eps=1e-12,
)
_LPIPS_TRUNKS = {"alex": "alexnet", "vgg": "vgg16"}


@dataclass
class Backbones:
    """Loaded metric networks (in eval mode, on ``device``) and how they were obtained.

    ``lpips`` is None when its trunk weights are not available; ``lpips_note`` says why.
    ``names`` describes each backbone for the metrics JSON and the report.
    """

    clip: nn.Module
    clip_preprocess: Callable
    clip_tokenizer: Callable
    dino: nn.Module
    dino_preprocess: Callable
    lpips: nn.Module | None
    lpips_note: str | None
    random: bool
    device: str
    names: dict[str, str | None] = field(default_factory=dict)


@contextlib.contextmanager
def _seeded(seed: int = _RANDOM_SEED) -> Iterator[None]:
    """Deterministic weight init that leaves the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- CLIP


def _cached_clip_checkpoint(cfg: dict) -> str | None:
    """Path of an already downloaded checkpoint for an open_clip pretrained config, or None."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        if filename.endswith(".bin"):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        # open_clip's own URL cache (download_pretrained_from_url's default cache_dir).
        path = Path.home() / ".cache" / "clip" / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def _load_clip(
    name: str, weights: str | os.PathLike | None, pretrained: str, random: bool, device: str
) -> tuple[nn.Module, Callable, Callable, str]:
    import open_clip

    if name not in open_clip.list_models():
        raise UsageError(
            f"unknown CLIP model {name!r} for --clip-model: use an open_clip architecture "
            f"name such as {DEFAULT_CLIP_MODEL}"
        )
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(name, pretrained) or {}
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    if random:
        with _seeded(), _quiet():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        label = f"{name} (random weights)"
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"--clip-weights {path} is not a file: pass an open_clip checkpoint")
        try:
            with _quiet():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=str(path), force_quick_gelu=quick_gelu
                )
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise UsageError(
                f"--clip-weights {path} is not an open_clip checkpoint of {name} "
                f"({one_line(err)}); pass the matching --clip-model"
            ) from None
        label = f"{name} ({path.name})"
    else:
        if not tag_cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise UsageError(
                f"open_clip has no pretrained tag {pretrained!r} for {name} (known: {tags}): "
                "pass --clip-weights PATH"
            )
        cached = _cached_clip_checkpoint(tag_cfg)
        if cached is None and hub_offline():
            raise UsageError(
                f"CLIP weights for {name} are not available offline: pass --clip-weights PATH "
                "(an open_clip checkpoint) or --random-backbones for a smoke test"
            )
        try:
            with _quiet():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name,
                    pretrained=cached or pretrained,
                    force_quick_gelu=quick_gelu if cached else False,
                )
        except (RuntimeError, OSError) as err:
            raise UsageError(
                f"CLIP weights for {name} ({pretrained}) could not be loaded "
                f"({one_line(err)}): pass --clip-weights PATH (an open_clip checkpoint) "
                "or --random-backbones"
            ) from None
        label = f"{name} ({pretrained})"
    tokenizer = open_clip.get_tokenizer(name)
    return model.to(device).eval(), preprocess, tokenizer, label


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence open_clip's and torchvision's chatter (logging and deprecation warnings)."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------- DINO


def _dino_preprocess() -> Callable:
    # The transform DreamBench re-implementations use for DINO ViT-S/16.
    return T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )


def _load_dino(
    weights: str | os.PathLike | None, random: bool, device: str
) -> tuple[nn.Module, str]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # unused-weight notices (e.g. the pooler) are expected
    try:
        return _build_dino(weights, random, device)
    finally:
        hf_logging.set_verbosity(verbosity)


def _build_dino(
    weights: str | os.PathLike | None, random: bool, device: str
) -> tuple[nn.Module, str]:
    from transformers import ViTConfig, ViTModel

    if random:
        with _seeded():
            model = ViTModel(ViTConfig(**_DINO_VITS16), add_pooling_layer=False)
        return model.to(device).eval(), "DINO ViT-S/16 (random weights)"

    if weights is None:
        try:
            model = ViTModel.from_pretrained(
                DEFAULT_DINO, add_pooling_layer=False, local_files_only=hub_offline()
            )
        except (OSError, ValueError) as err:
            if hub_offline():
                raise UsageError(
                    f"DINO weights {DEFAULT_DINO} are not available offline: pass --dino-weights "
                    "PATH (a folder with config.json + model.safetensors, or a .safetensors "
                    "file) or --random-backbones for a smoke test"
                ) from None
            raise UsageError(
                f"DINO weights {DEFAULT_DINO} could not be loaded ({one_line(err)}): "
                "pass --dino-weights PATH"
            ) from None
        return model.to(device).eval(), DEFAULT_DINO

    path = Path(weights)
    if path.is_dir():
        try:
            model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError(
                f"--dino-weights {path} is not a ViT model folder ({one_line(err)}): pass a "
                "folder with config.json and model.safetensors, or a .safetensors file"
            ) from None
    elif path.is_file() and path.suffix == ".safetensors":
        model = _dino_from_safetensors(path)
    else:
        raise UsageError(
            f"--dino-weights {path} is neither a model folder nor a .safetensors file: pass the "
            f"local copy of {DEFAULT_DINO}"
        )
    return model.to(device).eval(), f"DINO ViT-S/16 ({path.name})"


def _dino_from_safetensors(path: Path) -> nn.Module:
    """Load a bare ``.safetensors`` file (hub layout keys) through ``from_pretrained``.

    ``from_pretrained`` maps the hub checkpoint's key names onto the installed transformers'
    ViT, so the file is placed in a temporary model folder beside a config.json: the one next
    to the file if present, else ViT-S/16's.
    """
    import tempfile

    from transformers import ViTModel

    config_file = path.with_name("config.json")
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    else:
        config = {"model_type": "vit", "architectures": ["ViTModel"], **_DINO_VITS16}
    with tempfile.TemporaryDirectory(prefix="sdatom-dino-") as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        try:
            (folder / "model.safetensors").symlink_to(path.resolve())
        except OSError:  # no symlinks (Windows without developer mode)
            shutil.copyfile(path, folder / "model.safetensors")
        try:
            return ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise UsageError(
                f"--dino-weights {path} does not hold DINO ViT-S/16 weights ({one_line(err)})"
            ) from None


# --------------------------------------------------------------------------- LPIPS


def _torchvision_weights_file(trunk: str) -> Path:
    from torchvision import models

    enum = {"alexnet": models.AlexNet_Weights, "vgg16": models.VGG16_Weights}[trunk]
    url = enum.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_lpips(net: str, random: bool, device: str) -> tuple[nn.Module | None, str | None, str]:
    """LPIPS with its shipped linear heads; the trunk is torchvision's ImageNet network.

    The trunk weights are read from the torch hub cache only (never downloaded). Missing ->
    (None, reason, name): the diversity metric is reported as null with that reason.
    """
    if net not in _LPIPS_TRUNKS:
        raise UsageError(f"unknown LPIPS network {net!r}: use one of {', '.join(_LPIPS_TRUNKS)}")
    import lpips
    import torchvision

    trunk = _LPIPS_TRUNKS[net]
    name = f"LPIPS v0.1 {net}"
    weights_file = None
    if not random:
        weights_file = _torchvision_weights_file(trunk)
        if not weights_file.is_file():
            return (
                None,
                f"LPIPS needs torchvision's {trunk} ImageNet weights ({weights_file.name}) in the "
                f"torch hub cache {weights_file.parent}; they are not there, so LPIPS "
                "diversity is null",
                name,
            )
    with _seeded(), _quiet():
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if weights_file is not None:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        reference = getattr(torchvision.models, trunk)()
        reference.load_state_dict(state)
        # lpips splits the trunk's `features` into slices named by the original indices.
        for slice_ in model.net.children():
            for index, module in slice_.named_children():
                module.load_state_dict(reference.features[int(index)].state_dict())
    else:
        name += " (random trunk)"
    return model.to(device).eval(), None, name


# --------------------------------------------------------------------------- public


def _check_offline_weights(
    clip_model: str,
    clip_weights: str | os.PathLike | None,
    clip_pretrained: str,
    dino_weights: str | os.PathLike | None,
) -> None:
    """Offline: name every missing checkpoint in one error before loading anything."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    missing = []
    if clip_weights is None:
        cfg = open_clip.pretrained.get_pretrained_cfg(clip_model, clip_pretrained) or {}
        if cfg and _cached_clip_checkpoint(cfg) is None:
            missing.append(("CLIP", clip_model, "--clip-weights PATH (an open_clip checkpoint)"))
    if dino_weights is None:
        cached = try_to_load_from_cache(DEFAULT_DINO, "config.json")
        if not (isinstance(cached, str) and os.path.isfile(cached)):
            missing.append(("DINO", DEFAULT_DINO, "--dino-weights PATH (folder or .safetensors)"))
    if not missing:
        return
    what = " and ".join(f"{kind} weights for {name}" for kind, name, _ in missing)
    how = " and ".join(option for _, _, option in missing)
    raise UsageError(
        f"{what} are not available offline: pass {how} or --random-backbones for a smoke test"
    )


def load_backbones(
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_weights: str | os.PathLike | None = None,
    dino_weights: str | os.PathLike | None = None,
    random: bool = False,
    device: str = "cpu",
    *,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    lpips_net: str = "alex",
) -> Backbones:
    """Load CLIP, DINO ViT-S/16 and LPIPS for evaluation.

    Args:
        clip_model: open_clip architecture name (default ``ViT-B-32``, as in DreamBench).
        clip_weights: a local open_clip checkpoint of that architecture. It is taken to be the
            checkpoint of ``clip_pretrained`` (default ``openai``, which uses QuickGELU).
            None: the ``clip_pretrained`` tag from the hub cache (downloaded when online).
        dino_weights: a local copy of ``facebook/dino-vits16`` (folder or ``.safetensors``).
        random: build every backbone with seeded random weights (smoke tests only: the
            numbers then mean nothing about quality).
        device: torch device for all networks.
        clip_pretrained: open_clip pretrained tag (see ``open_clip.list_pretrained()``).
        lpips_net: LPIPS trunk, ``alex`` (default) or ``vgg``.

    Raises:
        UsageError: weights are missing offline or a weight file does not fit its backbone.
    """
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"--device {device!r} is not a torch device ({one_line(err)})") from None
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise UsageError(
            f"--clip-weights {clip_weights} is not a file: pass an open_clip checkpoint"
        )
    if dino_weights is not None and not Path(dino_weights).exists():
        raise UsageError(
            f"--dino-weights {dino_weights} does not exist: pass a local copy of {DEFAULT_DINO} "
            "(folder or .safetensors file)"
        )
    if not random and hub_offline():
        _check_offline_weights(clip_model, clip_weights, clip_pretrained, dino_weights)
    clip, clip_pre, tokenizer, clip_name = _load_clip(
        clip_model, clip_weights, clip_pretrained, random, device
    )
    dino, dino_name = _load_dino(dino_weights, random, device)
    lp, lp_note, lp_name = _load_lpips(lpips_net, random, device)
    return Backbones(
        clip=clip,
        clip_preprocess=clip_pre,
        clip_tokenizer=tokenizer,
        dino=dino,
        dino_preprocess=_dino_preprocess(),
        lpips=lp,
        lpips_note=lp_note,
        random=random,
        device=device,
        names={"clip": clip_name, "dino": dino_name, "lpips": lp_name if lp is not None else None},
    )
