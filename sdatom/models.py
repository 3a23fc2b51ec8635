"""Model specs: one function turns a spec into a diffusers Stable Diffusion (1.x, 2.x or XL)
pipeline; what differs between those families lives in :mod:`sdatom.families`.

A spec is one of

- a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local diffusers folder,
  loaded through diffusers' own ``from_pretrained``;
- a single ``.safetensors``/``.ckpt`` checkpoint file (diffusers' single-file loader);
- ``tiny``: a tiny SD-architecture pipeline with random weights, built offline and
  deterministically, with the real CLIP tokenizer (the embedded default for demos and tests);
- ``tiny-sdxl``: the same for SDXL (two text encoders of different widths, SDXL's topology);
- ``random:sd15`` / ``random:sd21`` / ``random:sdxl``: the real published architectures with
  random weights;
- ``toy``: the project's own pretrained toy-world model (32 px), shipped inside the package
  (see :mod:`sdatom.toyworld`): the one built-in model whose pictures mean something.

Built pipelines (``tiny``, ``random:*``) are cached on disk so repeated runs do not rebuild them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from sdatom.errors import ModelLoadError, UsageError, first_line
from sdatom.families import (
    ARCHITECTURES,
    Family,
    family_of,
    family_of_class,
    family_of_single_file,
)
from sdatom.families.base import Architecture
from sdatom.families.sd import CLIP_VOCAB_SIZE
from sdatom.fileio import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILT_SPECS = tuple(ARCHITECTURES)
SHIPPED_SPECS = ("toy",)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Bump when a built architecture or its initialisation changes: it invalidates the disk cache.
BUILD_VERSION = 1

# ----------------------------------------------------------------------------- devices


def resolve_device(name: str | None = None) -> torch.device:
    """``auto``/None picks cuda, then mps, then cpu; otherwise the named device, checked."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available: use --device cpu")
    return device


def auto_dtype(device: torch.device) -> str:
    """``--dtype auto``: fp16 on CUDA (the usual choice for SD inference), fp32 elsewhere
    (CPU has no fast fp16; MPS output in fp16 is not reliably correct)."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map ``auto``/``fp32``/``fp16``/``bf16`` to a torch dtype that works on ``device``."""
    if name == "auto":
        name = auto_dtype(device)
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs a GPU; on the CPU use --dtype fp32 or bf16")
    return DTYPES[name]


def enable_xformers(pipe_or_unet: Any, device: torch.device) -> bool:
    """Turn on xformers attention when it can work; otherwise warn why and keep torch SDPA."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        warnings.warn(
            "--xformers: xformers is not installed (pip install 'sdatom[xformers]'); "
            "using torch SDPA attention",
            stacklevel=2,
        )
        return False
    if device.type != "cuda":
        warnings.warn(
            f"--xformers: xformers needs a CUDA device, this run is on {device.type}; "
            "using torch SDPA attention",
            stacklevel=2,
        )
        return False
    pipe_or_unet.enable_xformers_memory_efficient_attention()
    return True


# ----------------------------------------------------------------------------- tokenizer


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49,408 tokens), built offline from open_clip's BPE file."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    # The same construction as CLIP's SimpleTokenizer: byte symbols, their word-final
    # forms, one token per merge, then the two special tokens.
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        pad_token=pad_token,
        model_max_length=77,
    )
    check_tokenizer(tokenizer, CLIP_VOCAB_SIZE, "open_clip's BPE file")
    return tokenizer


def check_tokenizer(tokenizer: Any, expected: int, source: str) -> None:
    """A tokenizer whose vocabulary does not fit the text encoder is an error, never a fallback."""
    if len(tokenizer) != expected:
        raise ModelLoadError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens but the text encoder "
            f"expects {expected}: the tokenizer files are missing or wrong"
        )


# ----------------------------------------------------------------------------- building


def build_unet(spec: str, device: str | torch.device = "cpu", seed: int = 0):
    """The UNet of a built architecture; on ``meta`` it costs no memory (for inspection)."""
    from diffusers import UNet2DConditionModel

    arch = _architecture(spec)
    if str(device) == "meta":
        with torch.device("meta"):
            return UNet2DConditionModel(**arch.unet)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**arch.unet).to(device)


def build_pipeline(spec: str, seed: int = 0):
    """The pipeline of a built ``spec`` (``tiny``, ``random:*``) with seeded random weights."""
    from sdatom.families import get_family

    arch = _architecture(spec)
    return get_family(arch.family).build(arch, seed)


def built_pipeline_dir(spec: str) -> Path:
    """The cached folder of a built spec, building and saving it (atomically) on first use."""
    arch = _architecture(spec)
    key = hashlib.sha256(
        json.dumps([spec, BUILD_VERSION, arch.__dict__], sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{spec.replace(':', '-')}-{key}"
    if (folder / "model_index.json").is_file():
        return folder
    logger.info("building %s (random weights) into %s", spec, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_pipeline(spec).save_pretrained(tmp, safe_serialization=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def shipped_model_dir(spec: str) -> Path:
    """The folder of a model that ships inside the package (``toy``)."""
    from sdatom.toyworld.model import TOY_MODEL_DIR

    if not (TOY_MODEL_DIR / "model_index.json").is_file():
        raise ModelLoadError(
            f"the toy model's weights are not in this install ({TOY_MODEL_DIR}): "
            "pretrain them with scripts/pretrain_toy.py, or use --model tiny"
        )
    return TOY_MODEL_DIR


def weights_fingerprint(spec: str | None) -> str | None:
    """A cheap fingerprint of a local model's UNet weights (size and first/last MiB), or None
    for hub ids and built random models (whose weights a name already fixes)."""
    if not spec or spec in BUILT_SPECS:
        return None
    path = shipped_model_dir(spec) if spec in SHIPPED_SPECS else Path(spec)
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors")) or sorted(
            (path / "unet").glob("*.bin")
        )
    else:
        files = [path] if path.is_file() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def _architecture(spec: str) -> Architecture:
    if spec not in ARCHITECTURES:
        raise ModelLoadError(f"unknown built model {spec!r}: use one of {', '.join(BUILT_SPECS)}")
    return ARCHITECTURES[spec]


# ----------------------------------------------------------------------------- loading


def hub_offline() -> bool:
    """True when the hub must not be asked: offline mode is set (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` as the environment says now, or huggingface_hub's own setting),
    or the hub cannot be reached.

    huggingface_hub reads its offline setting once, at import, and has no reachability
    check: without the probe below an unreachable hub costs minutes of retries before any
    error. The probe runs once per process.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        try:
            socket.create_connection((host, 443), timeout=3).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return not _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None


def default_model() -> str:
    """The model used when none is given: ``SDATOM_MODEL`` or SD-1.5."""
    return os.environ.get("SDATOM_MODEL") or DEFAULT_MODEL


def load_pipeline(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device | None = "cpu",
    xformers: bool = False,
    config: str | None = None,
    vae: str | None = None,
):
    """Turn a model spec into a diffusers pipeline of its family (``StableDiffusionPipeline``
    for SD-1.x/2.x, ``StableDiffusionXLPipeline`` for SDXL) on ``device`` in ``dtype``.

    ``config`` is the diffusers folder or hub id whose configs a single-file checkpoint uses
    (diffusers infers it from the checkpoint when online). ``vae`` replaces the model's VAE
    (a diffusers folder, hub id or single file), e.g. an fp16-safe SDXL VAE.
    """
    spec = spec or default_model()
    _quiet_loaders()
    device = resolve_device(str(device) if device is not None else None)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    if spec in BUILT_SPECS:
        pipe = _from_folder(built_pipeline_dir(spec), torch_dtype)
    elif spec in SHIPPED_SPECS:
        pipe = _from_folder(shipped_model_dir(spec), torch_dtype)
    elif spec.startswith("random:"):
        raise ModelLoadError(f"unknown built model {spec!r}: use one of {', '.join(BUILT_SPECS)}")
    elif Path(spec).suffix.lower() in CHECKPOINT_SUFFIXES:
        pipe = _from_single_file(Path(spec), torch_dtype, config)
    elif Path(spec).exists():
        pipe = _from_folder(Path(spec), torch_dtype)
    else:
        pipe = _from_hub(spec, torch_dtype)
    if vae:
        pipe.vae = load_vae(vae, torch_dtype)
    family = family_of(pipe)
    for tokenizer, encoder in zip(family.tokenizers(pipe), family.text_encoders(pipe), strict=True):
        check_tokenizer(tokenizer, encoder.config.vocab_size, spec)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if xformers:
        enable_xformers(pipe, device)
    return pipe


def _quiet_loaders() -> None:
    """No loading progress bars or notices from diffusers/transformers: sdatom reports."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def check_folder(folder: Path) -> Family:
    """The family of a diffusers pipeline folder; a folder that is not a supported pipeline is
    refused with the reason."""
    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json): pass a folder "
            "saved with save_pretrained, a hub id, a .safetensors checkpoint, or --model tiny"
        )
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index} is not valid JSON ({e.msg}): the folder is damaged")
    return family_of_class(cls, str(folder))


def _from_folder(folder: Path, torch_dtype: torch.dtype):
    family = check_folder(folder)
    try:
        return family.pipeline_class().from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, **family.load_kwargs
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the pipeline in {folder}: {first_line(e)}")


def _hub_family(model_id: str, offline: bool) -> Family:
    """The family of a hub model, from its ``model_index.json`` (a few hundred bytes)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model_id, local_files_only=offline)
    return family_of_class(index.get("_class_name", ""), model_id)


def _from_hub(model_id: str, torch_dtype: torch.dtype):
    offline = hub_offline()
    try:
        family = _hub_family(model_id, offline)
        return family.pipeline_class().from_pretrained(
            model_id, dtype=torch_dtype, local_files_only=offline, **family.load_kwargs
        )
    except (OSError, ValueError) as e:
        why = (
            "offline: the hub cannot be reached or HF_HUB_OFFLINE is set"
            if offline
            else (first_line(e))
        )
        raise ModelLoadError(
            f"cannot get model {model_id!r} ({why}); it is not in the local cache: pass "
            "--model PATH (a diffusers folder or .safetensors file) or --model tiny"
        )


def _single_file_family(path: Path, config: str | None) -> Family:
    if config:
        if Path(config).exists():
            return check_folder(Path(config))
        return _hub_family(config, hub_offline())
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return family_of_single_file(list(f.keys()), str(path))
    return family_of_single_file([], str(path))  # a pickle: read as SD-1.x/2.x


def _from_single_file(path: Path, torch_dtype: torch.dtype, config: str | None):
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        _check_safetensors_header(path)
    family = _single_file_family(path, config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if config:
        kwargs["config"] = config
        kwargs["local_files_only"] = Path(config).exists()
    try:
        return family.pipeline_class().from_single_file(str(path), **kwargs)
    except Exception as e:  # diffusers raises many types for a bad or foreign file
        raise ModelLoadError(_single_file_problem(path, e, config)) from e


def load_vae(spec: str, torch_dtype: torch.dtype):
    """A VAE to use instead of the model's own: a diffusers folder (a VAE or a whole
    pipeline), a hub id or a single ``.safetensors`` file."""
    from diffusers import AutoencoderKL

    path = Path(spec)
    try:
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            if not path.is_file():
                raise ModelLoadError(f"--vae {spec}: the file does not exist")
            return AutoencoderKL.from_single_file(str(path), torch_dtype=torch_dtype)
        sub = "vae" if (path / "model_index.json").is_file() else None
        local = path.exists() or hub_offline()
        return AutoencoderKL.from_pretrained(
            spec, subfolder=sub, torch_dtype=torch_dtype, local_files_only=local
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"--vae {spec}: cannot load a VAE from it ({first_line(e)}); pass a diffusers VAE "
            "folder, a pipeline folder, a hub id or a .safetensors file"
        ) from None


def _check_safetensors_header(path: Path) -> None:
    """A truncated or corrupt .safetensors file is named as such (the header is read only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"cannot load checkpoint {path}: not a readable safetensors file ({first_line(e)}); "
            "it is truncated or corrupt: download it again"
        ) from None


def _single_file_problem(path: Path, e: BaseException, config: str | None) -> str:
    chain, cause = [], e
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any("Unable to load weights" in str(x) for x in chain):
        # diffusers' torch.load runs with weights_only=True: a pickle that holds more than
        # tensors is refused, never executed.
        return (
            f"cannot load checkpoint {path}: not a readable checkpoint (corrupt, or a pickle "
            "holding more than plain tensors, which is never run); use a .safetensors file"
        )
    offline = any(n in type(x).__name__ for x in chain for n in ("LocalEntryNotFound", "Offline"))
    if config is None and offline:
        return (
            f"cannot load checkpoint {path}: offline (HF_HUB_OFFLINE is set or the hub cannot "
            "be reached), diffusers cannot fetch the configs of its architecture: pass "
            "--model-config with a diffusers folder of the same architecture, or use a "
            "diffusers pipeline folder as --model"
        )
    return f"cannot load checkpoint {path}: {first_line(e)}"
