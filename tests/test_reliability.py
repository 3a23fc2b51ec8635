"""Nothing lost, nothing executed: kills, Ctrl-C, NaN losses, full disks and untrusted files.

The kill tests use real ``sdatom train`` processes (the CLI app, with each loss computation
slowed by a sleep so that a signal lands mid-run) and real signals. Everything else runs
in-process on the tiny model at 32 px.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdatom.checkpoint import (
    Progress,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from sdatom.errors import AdapterError, CheckpointError, TrainingError
from sdatom.fileio import atomic_path

runner = CliRunner()
SDATOM = Path(__file__).resolve().parents[1] / "sdatom"
STEPS, EVERY = 8, 2


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def subject(tmp_path_factory, tiny_dir) -> Path:
    folder = tmp_path_factory.mktemp("data") / "dog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _args(subject: Path, output: Path, *extra: str) -> list[str]:
    return [
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
        str(STEPS),
        "--checkpoint-every",
        str(EVERY),
        "--no-prior",
        "--report-to",
        "none",
        "--output",
        str(output),
        *extra,
    ]


def _errors(stderr: str) -> list[str]:
    """The ``error:`` messages in ``stderr`` (a progress bar left open may precede one)."""
    return re.findall(r"error: [^\r\n]*", stderr)


def _error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    assert "Traceback" not in result.output
    lines = _errors(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference(subject, tmp_path_factory) -> Path:
    """The adapter of an uninterrupted run (in-process)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = runner.invoke(app(), _args(subject, out))
    assert result.exit_code == 0, result.output
    return out / "adapter.safetensors"


def app():
    from sdatom.cli import app

    return app


_SLOW_CLI = """
import sys, time
import sdatom.train as train

_loss = train.diffusion_loss


def slow_loss(*args, **kwargs):  # each step takes a little longer: the signal lands mid-run
    time.sleep({delay})
    return _loss(*args, **kwargs)


train.diffusion_loss = slow_loss
from sdatom.cli import app

app(prog_name="sdatom")
"""


def _start_slow_train(tmp_path: Path, args: list[str], delay: float = 0.4) -> subprocess.Popen:
    script = tmp_path / "slow_sdatom.py"
    script.write_text(_SLOW_CLI.format(delay=delay))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 90.0) -> None:
    """Until a complete checkpoint (a visible step folder with its state.json) exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((run / "checkpoints").glob("step-*/state.json")):
            return
        if proc.poll() is not None:
            pytest.fail(f"sdatom train ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


# ----------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_sigkill_mid_run_then_resume_latest_gives_the_same_adapter(subject, reference, tmp_path):
    run = tmp_path / "run"
    proc = _start_slow_train(tmp_path, _args(subject, run))
    _wait_for_checkpoint(proc, run)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "adapter.safetensors").exists()  # killed before the end
    last = latest_checkpoint(run)
    assert read_checkpoint(last).progress.step < STEPS

    result = runner.invoke(app(), _args(subject, run, "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "train_summary.json").read_text())["steps"] == STEPS
    _assert_same_adapter(run / "adapter.safetensors", reference)


_KILLED_WHILE_SAVING = """
import os, sys, time
from pathlib import Path

import torch

import sdatom.checkpoint as ck

run = Path(sys.argv[1])
weight = torch.nn.Parameter(torch.ones(4))
optimizer = torch.optim.AdamW([weight])
weight.grad = torch.ones(4)
optimizer.step()
with torch.no_grad():
    weight.fill_(1.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def save(step):
    ck.save_checkpoint(
        run / "checkpoints" / f"step-{step:06d}",
        progress=ck.Progress(step, 0, step),
        trainable={"w": weight.detach()},
        optimizer=optimizer,
        lr_scheduler=scheduler,
        scaler=None,
        config={"steps": 8},
    )


save(2)
real_save_file = ck.save_file


def stalled_save_file(tensors, path, *args, **kwargs):
    if Path(path).name == ck.OPTIMIZER_FILE:  # the 2nd of the 3 files: write half of it
        Path(path).write_bytes(b"\\x00" * 100)
        print("writing", flush=True)
        time.sleep(120)
    return real_save_file(tensors, path, *args, **kwargs)


ck.save_file = stalled_save_file
with torch.no_grad():
    weight += 1
save(4)
"""


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    script = tmp_path / "killed_while_saving.py"
    script.write_text(_KILLED_WHILE_SAVING)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    root = run / "checkpoints"
    half = [p for p in root.iterdir() if p.name.startswith(".step-000004.tmp")]
    assert len(half) == 1 and (half[0] / "trainable.safetensors").is_file()  # killed mid-write
    assert not (root / "step-000004").exists()
    assert list_checkpoints(run) == [(2, root / "step-000002")]
    assert latest_checkpoint(run) == root / "step-000002"
    checkpoint = read_checkpoint(root / "step-000002")
    assert checkpoint.progress.step == 2
    torch.testing.assert_close(checkpoint.trainable["w"], torch.ones(4))
    # A step folder without (or with a torn) state.json never counts either.
    (root / "step-000006").mkdir()
    (root / "step-000006" / "trainable.safetensors").write_bytes(b"\0" * 10)
    (root / "step-000008").mkdir()
    (root / "step-000008" / "state.json").write_text('{"step": 8, "epo')
    assert latest_checkpoint(run) == root / "step-000002"
    prune_checkpoints(run, keep=2)  # stale temporary folders are cleaned up
    assert not half[0].exists() and (root / "step-000002" / "state.json").is_file()


# ----------------------------------------------------------------------------- SIGINT


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_finishes(subject, reference, tmp_path):
    run = tmp_path / "run"
    proc = _start_slow_train(tmp_path, _args(subject, run))
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    errors = _errors(stderr)
    assert len(errors) == 1 and "--resume latest" in errors[0], stderr
    saved = Path(re.search(r"checkpoint saved in (\S+?)\. ", errors[0]).group(1))
    assert saved == latest_checkpoint(run)
    assert not (run / "adapter.safetensors").exists()

    result = runner.invoke(app(), _args(subject, run, "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "train_summary.json").read_text())["steps"] == STEPS
    _assert_same_adapter(run / "adapter.safetensors", reference)


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_sigterm_is_handled_like_ctrl_c_and_exits_143(subject, tmp_path):
    run = tmp_path / "run"
    proc = _start_slow_train(tmp_path, _args(subject, run))
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)  # what SLURM, Kubernetes and `timeout` send
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    errors = _errors(stderr)
    assert len(errors) == 1 and "terminated (SIGTERM)" in errors[0], stderr
    assert "--resume latest" in errors[0]
    saved = Path(re.search(r"checkpoint saved in (\S+?)\. ", errors[0]).group(1))
    assert saved == latest_checkpoint(run)
    assert not (run / "adapter.safetensors").exists()


@pytest.mark.slow
def test_one_ctrl_c_under_a_two_process_launch_saves_one_checkpoint(subject, tmp_path):
    """torchrun forwards the launcher's SIGINT to every worker: one checkpoint, one message,
    every process gone."""
    run = tmp_path / "run"
    script = tmp_path / "slow_sdatom.py"
    script.write_text(_SLOW_CLI.format(delay=0.4))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           *_args(subject, run, "--steps", "200", "--keep-checkpoints", "100")]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    _wait_for_checkpoint(proc, run, timeout=240)
    before = {step for step, _ in list_checkpoints(run)}
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the terminal reaches the launcher
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    new = {step for step, _ in list_checkpoints(run)} - before
    assert len(new) == 1, (sorted(before), sorted(new), stderr[-3000:])
    errors = [e for e in _errors(stderr) if "interrupted at step" in e]
    assert len(errors) == 1, stderr[-3000:]
    assert f"step {new.pop()}" in errors[0]
    assert not (run / "adapter.safetensors").exists()
    time.sleep(1.0)
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(script) in cmdline.read_bytes().decode(errors="replace"):
                left.append(cmdline.parent.name)
        except OSError:
            continue
    assert not left, f"workers still running: {left}"


# ----------------------------------------------------------------------------- NaN loss


def test_nan_loss_stops_with_advice_and_keeps_the_last_good_checkpoint(
    subject, tmp_path, monkeypatch
):
    import sdatom.train

    real, calls = sdatom.train.diffusion_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(sdatom.train, "diffusion_loss", nan_at_step_3)
    run = tmp_path / "run"
    line = _error_line(runner.invoke(app(), _args(subject, run)), code=1)
    assert "non-finite at step 3" in line and "lr 0.0001" in line and "mixed precision no" in line
    assert "--lr" in line and str(run / "checkpoints" / "step-000002") in line
    assert list_checkpoints(run) == [(2, run / "checkpoints" / "step-000002")]
    checkpoint = read_checkpoint(latest_checkpoint(run))
    assert checkpoint.progress.step == 2
    assert all(torch.isfinite(t).all() for t in checkpoint.trainable.values())
    assert not (run / "adapter.safetensors").exists()


def test_an_error_during_the_loop_starts_its_own_line(subject, tmp_path):
    result = runner.invoke(app(), _args(subject, tmp_path / "run", "--lr", "1e30"))
    assert result.exit_code == 1
    assert any(line.startswith("error: ") for line in result.stderr.split("\n")), result.stderr


def test_huge_learning_rate_is_stopped_before_nan_reaches_the_adapter(subject, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app(), _args(subject, run, "--lr", "1e30"))
    line = _error_line(result, code=1)
    assert "non-finite" in line and "lr 1e+30" in line and "mixed precision" in line
    assert not (run / "adapter.safetensors").exists()


# ----------------------------------------------------------------------------- disk full


def _tiny_state():
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(4)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return weight, optimizer, scheduler


def _save(run: Path, step: int, weight, optimizer, scheduler) -> Path:
    return save_checkpoint(
        run / "checkpoints" / f"step-{step:06d}",
        progress=Progress(step, 0, step),
        trainable={"w": weight.detach()},
        optimizer=optimizer,
        lr_scheduler=scheduler,
        scaler=None,
        config={"steps": 8},
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _disk_full_on_second_file(monkeypatch):
    import sdatom.checkpoint as ck

    real, calls = ck.save_file, []

    def full(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 50)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ck, "save_file", full)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    weight, optimizer, scheduler = _tiny_state()
    previous = _save(tmp_path, 2, weight, optimizer, scheduler)
    before = _snapshot(previous)
    _disk_full_on_second_file(monkeypatch)
    with pytest.raises((OSError, TrainingError)) as e:  # TrainingError once it is one line
        _save(tmp_path, 4, weight, optimizer, scheduler)
    error = e.value if isinstance(e.value, OSError) else e.value.__cause__
    assert error.errno == errno.ENOSPC
    assert _snapshot(previous) == before
    assert list_checkpoints(tmp_path) == [(2, previous)]
    assert latest_checkpoint(tmp_path) == previous
    assert not (tmp_path / "checkpoints" / "step-000004").exists()


def test_disk_full_while_training_is_one_line_and_cleans_up(subject, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _disk_full_on_second_file(monkeypatch)  # the 1st checkpoint (step 2) is the one that fails
    result = runner.invoke(app(), _args(subject, run))
    line = _error_line(result, code=1)
    assert "step-000002" in line and "No space left on device" in line
    assert "--resume latest" in line
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_atomic_path_keeps_the_existing_file_when_the_block_fails(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"the good adapter")
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_bytes() == b"the good adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"the new adapter")
    assert target.read_bytes() == b"the new adapter"


@pytest.mark.parametrize("when", ["re-saving a step", "pruning old checkpoints"])
def test_a_crash_while_deleting_a_checkpoint_leaves_no_torn_one_that_counts(
    tmp_path, monkeypatch, when
):
    import shutil

    weight, optimizer, scheduler = _tiny_state()
    _save(tmp_path, 2, weight, optimizer, scheduler)
    _save(tmp_path, 4, weight, optimizer, scheduler)
    real_rmtree = shutil.rmtree

    def dies_midway(path, *args, **kwargs):
        path = Path(path)
        if (path / "state.json").is_file() and (path / "trainable.safetensors").is_file():
            (path / "trainable.safetensors").unlink()  # one file gone, then the process dies
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        if when == "re-saving a step":
            _save(tmp_path, 4, weight, optimizer, scheduler)
        else:
            prune_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()
    found = list_checkpoints(tmp_path)
    assert [step for step, _ in found][-1] == 4
    for _, folder in found:  # every folder that counts is complete
        read_checkpoint(folder)


# ----------------------------------------------------------------------------- untrusted files


def _source_files() -> list[Path]:
    return sorted(SDATOM.rglob("*.py"))


def test_sources_never_unpickle_or_run_remote_code():
    offenders = []
    for path in _source_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{path.relative_to(SDATOM.parent)}:{n}: {line.strip()}"
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(where)
            if re.search(r"\b(c?pickle|dill|joblib|marshal)\b", code) and "import" in code:
                offenders.append(where)
            if re.search(r"pickle\.loads?\(|trust_remote_code\s*=\s*True|yaml\.unsafe_load", code):
                offenders.append(where)
            if re.search(r"yaml\.(full_)?load(_all)?\(", code) and "SafeLoader" not in code:
                offenders.append(where)
            if re.search(r"(?<![\w.])(eval|exec)\(|os\.system\(|shell\s*=\s*True", code):
                if not code.lstrip().startswith("def "):  # `def eval(`: the CLI command
                    offenders.append(where)
    assert not offenders, "\n".join(offenders)
    assert len(_source_files()) > 20  # the scan did look at the package


class _Booby:
    """Unpickling this creates the marker file: proof that the file was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bomb(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"unet.conv_in.atoms_delta": _Booby(marker)}))
    return path


def _zip_pickle_bomb(path: Path, marker: Path) -> Path:
    # What torch.save writes (a zip with a pickle inside), with the booby trap in it.
    torch.save({"state_dict": _Booby(marker)}, path)
    assert not marker.exists()
    return path


def test_pickle_disguised_as_an_adapter_is_refused_unexecuted(tmp_path, tiny_pipe):
    import sdatom

    marker = tmp_path / "PWNED"
    for make, name in [
        (_pickle_bomb, "adapter.safetensors"),
        (_zip_pickle_bomb, "adapter.ckpt"),
        (_pickle_bomb, "adapter.pt"),
    ]:
        bad = make(tmp_path / name, marker)
        with pytest.raises(AdapterError, match=re.escape(str(bad))):
            sdatom.load_atoms(tiny_pipe, bad)
    assert not marker.exists()


def test_pickle_disguised_as_a_run_adapter_is_refused_by_sample(tmp_path, tiny_dir):
    from test_runs import write_config

    marker, run = tmp_path / "PWNED", tmp_path / "run"
    write_config(run, str(tiny_dir), "atoms")
    _zip_pickle_bomb(run / "adapter.safetensors", marker)
    result = runner.invoke(
        app(), ["sample", "--run", str(run), "-p", "x", "-n", "1", "--steps", "1"]
    )
    assert "adapter.safetensors is not a readable safetensors file" in _error_line(result, 2)
    assert not marker.exists()


def test_pickle_disguised_as_a_checkpoint_is_refused_unexecuted(tmp_path):
    weight, optimizer, scheduler = _tiny_state()
    folder = _save(tmp_path, 2, weight, optimizer, scheduler)
    marker = tmp_path / "PWNED"
    _zip_pickle_bomb(folder / "trainable.safetensors", marker)
    with pytest.raises(CheckpointError, match="is damaged"):
        read_checkpoint(folder)
    assert not marker.exists()


def test_pickled_ckpt_as_base_model_is_not_executed(subject, tmp_path):
    marker = tmp_path / "PWNED"
    bad = _zip_pickle_bomb(tmp_path / "model.ckpt", marker)
    result = runner.invoke(app(), _args(subject, tmp_path / "run", "--model", str(bad)))
    line = _error_line(result, 2)
    assert f"cannot load checkpoint {bad}: not a readable checkpoint" in line
    assert not marker.exists()


def test_yaml_python_tags_in_a_config_are_an_error_not_executed(subject, tmp_path):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"steps: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    result = runner.invoke(app(), _args(subject, tmp_path / "run", "--config", str(config)))
    line = _error_line(result, 2)
    assert str(config) in line and "not valid YAML" in line
    preset = tmp_path / "evil-atoms.yaml"
    preset.write_text(f"!!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    result = runner.invoke(app(), _args(subject, tmp_path / "run", "--preset", str(preset)))
    assert str(preset) in _error_line(result, 2)
    assert not marker.exists()


def test_yaml_python_tags_in_a_run_config_are_an_error(tmp_path):
    marker, run = tmp_path / "PWNED", tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"method: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n"
    )
    result = runner.invoke(app(), ["sample", "--run", str(run), "-p", "x", "-n", "1"])
    assert "config.yaml cannot be read as YAML" in _error_line(result, 2)
    assert not marker.exists()


def test_paths_from_a_config_are_only_paths(subject, tmp_path):
    marker = tmp_path / "PWNED"
    evil = f"$(touch {marker}); `touch {marker}`"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"subject": evil, "class_dir": evil}))
    args = [a for a in _args(subject, tmp_path / "run") if a not in ("--subject", str(subject))]
    line = _error_line(runner.invoke(app(), [*args, "--config", str(config)]), 2)
    assert "does not exist" in line and evil in line
    result = runner.invoke(app(), _args(subject, tmp_path / "run2", "--model", evil))
    _error_line(result, 2)
    assert not marker.exists()
