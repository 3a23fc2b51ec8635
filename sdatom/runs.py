"""Run folders written by ``sdatom train``: read one, and load its adapted pipeline.

A run folder ``runs/<name>/`` holds ``config.yaml`` (the resolved training config, flat
keys: ``model``, ``method``, ``token``, ``class_name``, ...) and the trained result:
``adapter.safetensors`` (method ``atoms``: an sdatom atoms file),
``pytorch_lora_weights.safetensors`` (method ``lora``: a diffusers LoRA file, so that
``pipe.load_lora_weights(run_dir)`` loads it; older runs named it ``adapter.safetensors``) or
``unet/`` (method ``full``: a diffusers UNet folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from sdatom.errors import AdapterError, ConfigError, UsageError, first_line
from sdatom.methods import ADAPTER_FILE, METHODS, get_method

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "METHODS",
    "SUMMARY_FILE",
    "Run",
    "as_run",
    "find_run",
    "load_run_pipeline",
    "read_run",
]

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "train_summary.json"


@dataclass(frozen=True)
class Run:
    """A training run folder: its resolved config, its summary, method and trained result.

    ``adapter`` is ``adapter.safetensors`` for the atoms method,
    ``pytorch_lora_weights.safetensors`` (or an older run's ``adapter.safetensors``) for lora
    and the ``unet/`` folder for the full method (None when the run was read for its summary only).
    ``config`` (config.yaml) and ``summary`` (train_summary.json) are empty when not read.
    """

    path: Path
    config: dict[str, Any]
    method: str
    adapter: Path | None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run's folder name."""
        return self.path.name

    @property
    def model(self) -> str | None:
        """The base model spec the run was trained on."""
        value = (self.config or self.summary).get("model")
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


def read_run(run_dir: str | os.PathLike, *, need: str = "adapter") -> Run:
    """Read the run folder ``run_dir``: the one reader of run folders.

    ``need="adapter"`` (sample, eval, export): ``config.yaml`` and a finished adapter of the
    configured method. ``need="summary"`` (compare): ``train_summary.json`` only.

    Raises:
        UsageError: the folder is missing or is not an sdatom run folder.
        ConfigError: ``config.yaml`` is unreadable or names an unknown method.
        AdapterError: the adapter is missing (the run did not finish) or of another method.
    """
    path = Path(run_dir)
    if need == "summary":
        summary = read_json_object(_run_file(path, SUMMARY_FILE), "re-run `sdatom train`")
        return Run(path, {}, str(summary.get("method")), None, summary=summary)
    config_path = _run_file(path, CONFIG_FILE)
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{config_path} cannot be read as YAML ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} is not a YAML mapping of training settings")
    name = str(config.get("method", "atoms"))
    if name not in METHODS:
        raise ConfigError(f"{config_path}: method {name!r} is not one of {', '.join(METHODS)}")
    method = get_method(name)
    adapter = method.result_path(path)
    if not method.is_saved(adapter):
        raise AdapterError(
            f"{path} has no {adapter.name}{'' if adapter.suffix else '/'}: the run did not "
            "finish; continue it with `sdatom train --resume latest` (same config)"
        )
    method.check_result(adapter)
    summary = _summary_or_empty(path)
    return Run(path=path, config=config, method=name, adapter=adapter, summary=summary)


def as_run(run: str | os.PathLike | Run) -> Run:
    """``run`` itself when it is already a :class:`Run`, else the finished run it names."""
    return run if isinstance(run, Run) else read_run(run)


def _run_file(path: Path, name: str) -> Path:
    """``path / name``, or UsageError when ``path`` is not a run folder holding it."""
    if not path.is_dir():
        raise UsageError(
            f"run folder {path} does not exist (no such folder): pass a folder runs/<name> "
            "written by `sdatom train`"
        )
    if not (path / name).is_file():
        raise UsageError(
            f"{path} is not an sdatom run folder (no {name}): pass a folder written by "
            "`sdatom train`"
        )
    return path / name


def find_run(*folders: Path) -> Run | None:
    """The first of ``folders`` that is a run with a readable summary (None: none is)."""
    for folder in folders:
        summary = _summary_or_empty(folder)
        if summary:
            return Run(folder, {}, str(summary.get("method")), None, summary=summary)
    return None


def _summary_or_empty(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; UsageError (saying ``what`` to do) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}): {what}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} does not hold a JSON object: {what}")
    return data


def load_run_pipeline(
    run_dir: str | os.PathLike | Run,
    *,
    merge: bool = True,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device | None = "cpu",
    model: str | None = None,
    xformers: bool = False,
    model_config: str | None = None,
    vae: str | None = None,
    force: bool = False,
):
    """Load the run's base model (or ``model`` instead) and apply the run's trained adapter.

    Atoms are loaded with ``load_atoms`` and folded into the weights when ``merge`` (the
    default; ``merge=False`` keeps the atom layers live); LoRA is loaded with
    ``load_lora_weights`` and fused when ``merge``; a full fine-tune swaps in its UNet.
    ``force`` loads atoms whose base-model fingerprint does not match (with a warning).
    ``vae`` replaces the VAE (default: the run's own ``vae`` setting, if any).
    Returns the family's pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``).
    """
    from sdatom.models import load_pipeline

    run = as_run(run_dir)
    spec = model or run.model
    if not spec:
        raise ConfigError(
            f"{run.path / CONFIG_FILE} names no 'model'; pass the base model with --model"
        )
    model_config = model_config or (None if model else run.config.get("model_config"))
    vae = vae or (None if model else run.config.get("vae"))
    pipe = load_pipeline(
        spec, dtype=dtype, device=device, xformers=xformers, config=model_config, vae=vae
    )
    pipe = get_method(run.method).apply(pipe, run.adapter, merge=merge, force=force, spec=spec)
    if run.config.get("train_token"):
        from sdatom.token_embedding import load_into

        load_into(pipe, run.path, run.config["token"])
    return pipe
