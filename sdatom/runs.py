"""Run folders written by ``sdatom train``: read one, and load its adapted pipeline.

A run folder ``runs/<name>/`` holds ``config.yaml`` (the resolved training config, flat
keys: ``model``, ``method``, ``token``, ``class_name``, ...) and the trained result:
``adapter.safetensors`` (method ``atoms``: an sdatom atoms file; method ``lora``: a diffusers
LoRA file) or ``unet/`` (method ``full``: a diffusers UNet folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open

from sdatom.errors import AdapterError, ConfigError, UsageError

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "METHODS", "Run", "load_run_pipeline", "read_run"]

CONFIG_FILE = "config.yaml"
ADAPTER_FILE = "adapter.safetensors"
UNET_FOLDER = "unet"
METHODS = ("atoms", "lora", "full")
ATOMS_FORMAT = "sdatom-atoms"


@dataclass(frozen=True)
class Run:
    """A finished training run: its folder, resolved config, method and adapter location.

    ``adapter`` is ``adapter.safetensors`` for the atoms and lora methods and the ``unet/``
    folder for the full method.
    """

    path: Path
    config: dict[str, Any]
    method: str
    adapter: Path

    @property
    def name(self) -> str:
        """The run's folder name."""
        return self.path.name

    @property
    def model(self) -> str | None:
        """The base model spec the run was trained on."""
        value = self.config.get("model")
        return str(value) if value else None

    @property
    def subject_text(self) -> str:
        """``"<token> <class_name>"``, e.g. ``"sks dog"`` (ConfigError when either is missing)."""
        token, cls = self.config.get("token"), self.config.get("class_name")
        if not token or not cls:
            raise ConfigError(
                f"{self.path / CONFIG_FILE}: 'token' and 'class_name' are needed for the "
                "protocol prompts; pass prompts with --prompt or --prompts-file instead"
            )
        return f"{token} {cls}"


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read the run folder ``run_dir`` and check that its trained adapter is there and fits.

    Raises:
        UsageError: the folder is missing or is not an sdatom run folder.
        ConfigError: ``config.yaml`` is unreadable or names an unknown method.
        AdapterError: the adapter is missing (the run did not finish) or of another method.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"--run {path}: no such folder; pass a folder runs/<name> of sdatom train")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise UsageError(
            f"--run {path} is not an sdatom run folder (no {CONFIG_FILE}); pass a folder "
            "written by `sdatom train`"
        )
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{config_path} cannot be read as YAML ({why})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} is not a YAML mapping of training settings")
    method = str(config.get("method", "atoms"))
    if method not in METHODS:
        raise ConfigError(f"{config_path}: method {method!r} is not one of {', '.join(METHODS)}")

    adapter = path / (UNET_FOLDER if method == "full" else ADAPTER_FILE)
    done = (adapter / "config.json").is_file() if method == "full" else adapter.is_file()
    if not done:
        raise AdapterError(
            f"{path} has no {adapter.name}{'/' if method == 'full' else ''}: the run did not "
            "finish; continue it with `sdatom train --resume latest` (same config)"
        )
    if method != "full":
        _check_adapter_kind(adapter, method)
    return Run(path=path, config=config, method=method, adapter=adapter)


def _check_adapter_kind(adapter: Path, method: str) -> None:
    """Refuse an adapter file written by the other method (config.yaml and file disagree)."""
    try:
        with safe_open(str(adapter), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(
            f"{adapter} is not a readable safetensors file ({why}): it is truncated or corrupt"
        ) from None
    is_atoms = meta.get("format") == ATOMS_FORMAT
    is_lora = any("lora" in k for k in keys)
    if method == "atoms" and not is_atoms:
        kind = "a LoRA file" if is_lora else "not an sdatom atoms file"
        raise AdapterError(
            f"{adapter} is {kind} but config.yaml says method: atoms; fix 'method' in "
            f"{adapter.parent / CONFIG_FILE} or retrain"
        )
    if method == "lora" and (is_atoms or not is_lora):
        kind = "an sdatom atoms file" if is_atoms else "not a LoRA file (no lora keys)"
        raise AdapterError(
            f"{adapter} is {kind} but config.yaml says method: lora; fix 'method' in "
            f"{adapter.parent / CONFIG_FILE} or retrain"
        )


def load_run_pipeline(
    run_dir: str | os.PathLike | Run,
    *,
    merge: bool = True,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device | None = "cpu",
    model: str | None = None,
    xformers: bool = False,
    model_config: str | None = None,
    force: bool = False,
):
    """Load the run's base model (or ``model`` instead) and apply the run's trained adapter.

    Atoms are loaded with ``load_atoms`` and folded into the weights when ``merge`` (the
    default; ``merge=False`` keeps the atom layers live); LoRA is loaded with
    ``load_lora_weights`` and fused when ``merge``; a full fine-tune swaps in its UNet.
    ``force`` loads atoms whose base-model fingerprint does not match (with a warning).
    Returns a ``StableDiffusionPipeline``.
    """
    from sdatom.models import load_pipeline

    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    spec = model or run.model
    if not spec:
        raise ConfigError(
            f"{run.path / CONFIG_FILE} names no 'model'; pass the base model with --model"
        )
    model_config = model_config or (None if model else run.config.get("model_config"))
    pipe = load_pipeline(spec, dtype=dtype, device=device, xformers=xformers, config=model_config)
    if run.method == "atoms":
        from sdatom.atoms import load_atoms, merge_atoms

        load_atoms(pipe.unet, run.adapter, force=force)
        if merge:
            merge_atoms(pipe.unet)
    elif run.method == "lora":
        try:
            pipe.load_lora_weights(str(run.path), weight_name=ADAPTER_FILE)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise AdapterError(
                f"{run.adapter} does not load onto {spec} ({why}); is it the run's base model?"
            ) from None
        if merge:
            pipe.fuse_lora()
    else:
        pipe.unet = _load_unet(run.adapter, pipe.unet.dtype, pipe.unet.device)
    return pipe


def _load_unet(folder: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AdapterError(f"cannot load the fine-tuned UNet in {folder} ({why})") from None
    return unet.to(device)
