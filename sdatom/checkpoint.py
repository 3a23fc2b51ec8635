"""Resumable training checkpoints: safetensors and JSON only, written atomically.

A checkpoint is a folder ``checkpoints/step-000100/`` holding

- ``trainable.safetensors``: the trainable tensors (atoms, LoRA factors or the whole UNet);
- ``optimizer.safetensors`` + the structure in ``state.json``;
- ``state.json``: step, epoch and batches seen, the LR scheduler's and grad scaler's state,
  the RNG states, and the config the run was started with.

Nothing is pickled, so a checkpoint from elsewhere cannot run code. The folder is written
under a temporary name and renamed into place: a kill during a write leaves the previous
checkpoints intact and never a half-written one that looks complete. Progress is read from
``state.json``, never parsed from folder names.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdatom.errors import CheckpointError, TrainingError
from sdatom.fileio import _fsync_dir

# Schedules whose learning rate at a step does not depend on the total number of steps.
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# Config fields that may differ between a run and its resumption (they change no result).
RESUMABLE_CHANGES = {
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "validation_every",
    "report_to",
    "device",
    "ddp_timeout",
}

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class Progress:
    """Where a run stands: optimizer steps done, the epoch, and batches seen in that epoch."""

    step: int
    epoch: int
    batches_in_epoch: int


def _optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return None  # callables (LambdaLR's lambdas) are rebuilt from the config, not stored


def save_checkpoint(
    folder: str | os.PathLike,
    *,
    progress: Progress,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    config: dict[str, Any],
) -> Path:
    """Write a checkpoint folder atomically and return its path."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, progress, trainable, optimizer, lr_scheduler, scaler, config)
        _replace_folder(tmp, folder)
    except OSError as e:  # a full disk, most often: the previous checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(
            f"cannot write checkpoint {folder}: {e.strerror or e}; the previous checkpoints are "
            "kept: free some space, then continue with --resume latest"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_checkpoint(tmp, progress, trainable, optimizer, lr_scheduler, scaler, config):
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_state()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / TRAINABLE_FILE
    )
    save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER_FILE)
    state = {
        "format": "sdatom-checkpoint/1",
        "step": progress.step,
        "epoch": progress.epoch,
        "batches_in_epoch": progress.batches_in_epoch,
        "optimizer": opt_meta,
        "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
        "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
        "rng": rng_meta,
        "config": config,
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)


def _replace_folder(new: Path, folder: Path) -> None:
    """Move ``new`` to ``folder``; an existing ``folder`` is first renamed out of the way
    (hidden, so it stops counting) and deleted afterwards: no crash leaves a torn one."""
    if folder.exists():  # the same step saved again (e.g. on Ctrl-C right after a save)
        _delete_folder(folder, then=lambda: os.replace(new, folder))
    else:
        os.replace(new, folder)
    _fsync_dir(folder.parent)


def _delete_folder(path: Path, then=None) -> None:
    """Delete a checkpoint folder so that a crash half-way never leaves a counting torn one."""
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    _fsync_dir(path.parent)
    if then is not None:
        then()
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    progress: Progress
    trainable: dict[str, torch.Tensor]
    state: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor]

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]

    def restore(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any, scaler: Any) -> None:
        """Load the optimizer, scheduler, scaler and RNG states saved with this checkpoint."""
        opt = {k: v for k, v in self.optimizer_tensors.items() if not k.startswith("rng.")}
        optimizer.load_state_dict(_optimizer_from_flat(opt, self.state["optimizer"]))
        sched = {k: v for k, v in self.state["lr_scheduler"].items() if v is not None}
        lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **sched})
        if scaler is not None and self.state.get("scaler"):
            scaler.load_state_dict(self.state["scaler"])
        rng = {k: v for k, v in self.optimizer_tensors.items() if k.startswith("rng.")}
        _set_rng_state(rng, self.state["rng"])


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder; anything missing or damaged is a CheckpointError."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(
            f"--resume {folder}: no checkpoint there (no {STATE_FILE}); pass a "
            "checkpoints/step-N folder of a run, or --resume latest"
        )
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        trainable = load_file(str(folder / TRAINABLE_FILE))
        optimizer_tensors = load_file(str(folder / OPTIMIZER_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {folder} is damaged ({e}); resume from another one")
    progress = Progress(state["step"], state["epoch"], state["batches_in_epoch"])
    return Checkpoint(folder, progress, trainable, state, optimizer_tensors)


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first (step from state.json)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for sub in root.iterdir():
            if sub.name.startswith(".") or not (sub / STATE_FILE).is_file():
                continue
            try:
                found.append((int(json.loads((sub / STATE_FILE).read_text())["step"]), sub))
            except (ValueError, KeyError, OSError):
                continue  # a damaged folder is not a checkpoint
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint of a run; none is a CheckpointError, not a fresh start."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"--resume latest: {run_dir} holds no checkpoint yet; start the run again with "
            "--overwrite instead of --resume"
        )
    return found[-1][1]


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (and stale temporary folders)."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _delete_folder(path)
        removed.append(path)
    if root.is_dir():
        for stale in [*root.glob(".*.tmp*"), *root.glob(".*.old*")]:
            shutil.rmtree(stale, ignore_errors=True)
    return removed


def find_resume(config: Any, output: Path, resume: str | None) -> Checkpoint | None:
    """The checkpoint ``--resume`` names (``"latest"`` or a folder) for the run ``config``
    (its resolved TrainConfig) in ``output``; None without ``resume``.

    Raises CheckpointError when the checkpoint was made with options that change the result,
    or with another ``--steps`` under a schedule that depends on the total.
    """
    from sdatom.config import TrainConfig

    if resume is None:
        return None
    path = latest_checkpoint(output) if resume == "latest" else Path(resume)
    checkpoint = read_checkpoint(path)
    saved = TrainConfig.from_dict(checkpoint.config, source=f"{path}/state.json")
    differs = [
        k
        for k, v in config.to_dict().items()
        if k not in RESUMABLE_CHANGES and saved.to_dict().get(k) != v
    ]
    if differs:
        raise CheckpointError(
            f"--resume {path}: the checkpoint was made with different {', '.join(differs)}; "
            "resume with the options of the original run"
        )
    c = config
    if saved.steps != c.steps and c.lr_scheduler not in STEP_FREE_SCHEDULES:
        # The schedule's shape depends on the total: a new total would make the LR jump.
        raise CheckpointError(
            f"--resume {path}: --steps {c.steps} differs from the run's {saved.steps}, and the "
            f"{c.lr_scheduler!r} schedule depends on the total, so its learning rate would jump; "
            f"resume with --steps {saved.steps} (only constant schedules can change --steps)"
        )
    return checkpoint
