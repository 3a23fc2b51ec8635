"""TrainConfig: every option of a training run, validated in one place.

A config comes from defaults, then a YAML file (``--config``), then command-line options.
It never changes during a run: values derived from it (the learning rate a method defaults
to, the number of class images, the output folder) are resolved once, before training, and
the resolved config is what ``config.yaml`` in the run folder holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sdatom import __version__
from sdatom.errors import ConfigError, first_line
from sdatom.methods import METHODS

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "polynomial")
REPORT_TO = ("tensorboard", "wandb", "none")
CONFIG_FORMAT = "sdatom-train-config/1"


def _field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text is stored once, in its metadata."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """All settings of a DreamBooth-style training run (see each field's ``help``)."""

    # What to train on
    subject: str | None = _field(None, "Folder of subject photos (3-5 photos is typical).")
    class_name: str | None = _field(None, "The subject's class, e.g. dog (never guessed).")
    token: str = _field("sks", "Placeholder token that names the subject in prompts.")
    train_token: bool = _field(
        False,
        "Also train the token's input embedding in each text encoder (pivotal tuning: "
        "textual inversion beside the method); --token must be a single token.",
    )
    token_lr: float = _field(
        5e-4, "Learning rate of the token's embedding (--train-token). Default 5e-4; toy 5e-3."
    )
    token_vectors: int = _field(
        1,
        "Vectors in the token's embedding (--train-token): N > 1 makes the token N tokens "
        "long, as multi-vector textual inversion. Default 1; toy 4.",
    )
    model: str | None = _field(
        None, "Base model spec (hub id, folder, file, toy, tiny, tiny-sdxl, random:sd15/sd21/sdxl)."
    )
    model_config: str | None = _field(
        None, "For a single-file --model: the diffusers folder or hub id of its configs."
    )
    vae: str | None = _field(
        None,
        "A VAE to use instead of the model's (folder, hub id or file), e.g. an fp16-fix SDXL VAE.",
    )
    output: str | None = _field(None, "Run folder. Default: runs/<subject folder name>.")
    # Method
    method: str = _field("atoms", "What to tune: atoms, lora (peft baseline) or full (DreamBooth).")
    preset: str = _field("atoms-attn", "Atom preset: atoms, atoms-paper, atoms-oc, atoms-attn.")
    atoms: dict | None = _field(None, "Custom atom config (AtomConfig fields); overrides preset.")
    lora_rank: int = _field(4, "LoRA rank (method lora).")
    lora_targets: tuple[str, ...] = _field(
        ("to_k", "to_q", "to_v", "to_out.0"), "LoRA target modules (diffusers' default)."
    )
    # Data
    resolution: int | None = _field(
        None, "Training resolution in pixels, a multiple of 8. Default: the model's own."
    )
    center_crop: bool = _field(True, "Center crop (else random crop).")
    hflip: float = _field(0.0, "Probability of a horizontal flip.")
    # Prior preservation
    prior: bool = _field(True, "Prior preservation with class images.")
    class_dir: str | None = _field(None, "Folder of class images (else generated and cached).")
    num_class_images: int | None = _field(None, "Class images to use. Default: 100, 8 for tiny.")
    prior_loss_weight: float = _field(1.0, "Weight of the prior-preservation loss.")
    class_sample_steps: int | None = _field(
        None, "Denoising steps for generated class images. Default: 30, 4 for tiny."
    )
    class_batch_size: int = _field(4, "Class images generated together, per process.")
    # Optimisation
    steps: int = _field(400, "Optimizer steps.")
    batch_size: int = _field(1, "Instance images per process and step.")
    grad_accum: int = _field(1, "Gradient accumulation steps.")
    lr: float | None = _field(
        None, "Learning rate. Default per method: atoms/lora 1e-4, full 5e-6."
    )
    lr_scheduler: str = _field("constant", f"One of {', '.join(LR_SCHEDULERS)}.")
    lr_warmup_steps: int = _field(0, "Learning-rate warm-up steps.")
    adam_weight_decay: float = _field(1e-2, "AdamW weight decay.")
    use_8bit_adam: bool = _field(False, "8-bit AdamW (needs bitsandbytes).")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 = off).")
    snr_gamma: float | None = _field(
        None, "Min-SNR weighting gamma (5.0 is usual; off by default)."
    )
    noise_offset: float = _field(0.0, "Noise offset (0.05-0.1 helps very dark/bright images).")
    seed: int = _field(0, "Random seed (data order, noise, timesteps).")
    # Speed and memory
    mixed_precision: str | None = _field(
        None,
        "Mixed precision: no, fp16, bf16. Default: accelerate's own setting (accelerate launch "
        "--mixed_precision, accelerate config, $ACCELERATE_MIXED_PRECISION), else no.",
    )
    gradient_checkpointing: bool = _field(False, "Trade compute for memory in the UNet.")
    cache_latents: bool = _field(True, "Encode each image with the VAE once.")
    xformers: bool = _field(False, "xformers attention (CUDA only; else torch SDPA).")
    device: str | None = _field(
        None, "cpu trains on the CPU even when a GPU is visible (GPUs are chosen by accelerate)."
    )
    # Validation, checkpoints, logging
    validation_prompts: tuple[str, ...] = _field(
        (), "Prompts sampled during training. Default: the instance prompt."
    )
    validation_every: int = _field(0, "Sample validation prompts every N steps (0 = off).")
    validation_images: int = _field(2, "Images per validation prompt.")
    validation_steps: int = _field(25, "Denoising steps of validation samples.")
    checkpoint_every: int = _field(100, "Save a resumable checkpoint every N steps (0 = off).")
    keep_checkpoints: int = _field(2, "Checkpoints to keep (oldest are deleted).")
    report_to: str = _field("tensorboard", "Logger: tensorboard, wandb or none.")
    ddp_timeout: int = _field(1800, "Seconds a process waits for the others before giving up.")

    def __post_init__(self) -> None:
        for name in ("lora_targets", "validation_prompts"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        _validate(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (None values are ignored: they mean "not given")."""
        changes = {k: v for k, v in changes.items() if v is not None}
        check_keys(changes, "option")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("lora_targets", "validation_prompts"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys are an error naming the closest valid one."""
        data = {k: v for k, v in data.items() if k not in ("format", "sdatom_version")}
        check_keys(data, source)
        for f in fields(cls):
            if f.name in data:
                data[f.name] = _coerce(f, data[f.name], source)
        return cls(**data)


def field_help(name: str) -> str:
    """The help text of a TrainConfig field, with its default: documented once, used by the CLI."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    text = f.metadata["help"]
    if f.default not in (None, (), "") and "Default" not in text:
        default = ", ".join(f.default) if isinstance(f.default, tuple) else f.default
        text += f" (default: {default})"
    return text


def check_keys(data: dict[str, Any], source: str) -> None:
    valid = [f.name for f in fields(TrainConfig)]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Check a YAML value against the field's type (ints are accepted for floats)."""
    kinds = [t.strip() for t in str(f.type).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{source}: {f.name} cannot be empty")
    for kind in kinds:
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind in _TYPES and type(value) is _TYPES[kind]:
            return value
        if kind == "dict" and isinstance(value, dict):
            return value
        if kind.startswith("tuple") and isinstance(value, list | tuple | str):
            return value
    raise ConfigError(f"{source}: {f.name} must be {f.type}, got {value!r}")


def _validate(c: TrainConfig) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{name}: {why}, got {getattr(c, name)!r}")

    choices = {
        "method": METHODS,
        "mixed_precision": MIXED_PRECISION,
        "lr_scheduler": LR_SCHEDULERS,
        "report_to": REPORT_TO,
    }
    for name, allowed in choices.items():
        if name == "mixed_precision" and c.mixed_precision is None:
            continue  # not set: accelerate's own setting applies
        if getattr(c, name) not in allowed:
            raise bad(name, f"must be one of {', '.join(allowed)}")
    if c.resolution is not None and (c.resolution <= 0 or c.resolution % 8):
        raise bad("resolution", "must be a positive multiple of 8 (the VAE downsamples by 8)")
    positive = (
        "steps",
        "batch_size",
        "grad_accum",
        "lora_rank",
        "validation_images",
        "token_vectors",
        "class_batch_size",
    )
    for name in positive:
        if getattr(c, name) <= 0:
            raise bad(name, "must be a positive integer")
    for name in ("num_class_images", "class_sample_steps"):
        if getattr(c, name) is not None and getattr(c, name) <= 0:
            raise bad(name, "must be a positive integer")
    for name in ("lr_warmup_steps", "checkpoint_every", "keep_checkpoints", "validation_every"):
        if getattr(c, name) < 0:
            raise bad(name, "must be 0 or more")
    for name in ("lr", "token_lr"):
        value = getattr(c, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise bad(name, "must be a positive number")
    if not 0.0 <= c.hflip <= 1.0:
        raise bad("hflip", "must be a probability in [0, 1]")
    for name in ("prior_loss_weight", "max_grad_norm", "noise_offset", "adam_weight_decay"):
        if not (getattr(c, name) >= 0 and math.isfinite(getattr(c, name))):
            raise bad(name, "must be a number >= 0")
    if c.snr_gamma is not None and not c.snr_gamma > 0:
        raise bad("snr_gamma", "must be a positive number")
    if not c.token.strip() or len(c.token.split()) != 1:
        raise bad("token", "must be one word")
    if c.keep_checkpoints == 0 and c.checkpoint_every:
        raise bad("keep_checkpoints", "must be at least 1 when checkpoint_every is set")


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config (safe loader); errors name the file and the key."""
    return TrainConfig.from_dict(read_config_file(path), source=str(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options a YAML config file sets (checked: unknown keys and wrong types fail)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({first_line(e)})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    TrainConfig.from_dict(data, source=str(path))  # validate here, naming the file
    return {k: v for k, v in data.items() if k not in ("format", "sdatom_version")}


def dump_config(config: TrainConfig) -> str:
    """The YAML text of a config, tagged with its format and the sdatom version."""
    data = {"format": CONFIG_FORMAT, "sdatom_version": __version__, **config.to_dict()}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def model_defaults(model: str | None) -> dict[str, Any]:
    """Training defaults of a model that has its own (``toy``: measured on the toy world)."""
    if model == "toy":
        from sdatom.toyworld.model import TRAIN_DEFAULTS

        return dict(TRAIN_DEFAULTS)
    return {}


def build_config(config_file: str | Path | None, **options: Any) -> TrainConfig:
    """Defaults, the model's own defaults, the YAML file, then the command line (not None).

    ``preset`` may name a YAML atom config file: it then fills ``atoms``.
    """
    from sdatom.models import default_model

    from_file = read_config_file(config_file) if config_file else {}
    model = options.get("model") or from_file.get("model") or default_model()
    base = TrainConfig.from_dict({**model_defaults(model), **from_file}, source=str(config_file))
    preset = options.get("preset")
    if preset and str(preset).endswith((".yaml", ".yml")):
        from sdatom.atoms import AtomConfig

        if not Path(preset).is_file():
            raise ConfigError(f"--preset {preset}: no such atom config file")
        options["atoms"] = AtomConfig.from_yaml(preset).to_dict()
        options["preset"] = f"custom:{Path(preset).name}"
    return base.replace(**options)
