"""Training: the loss, learning, exact resume, multi-process equivalence, methods, configs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sdatom.config import TrainConfig, build_config, load_config
from sdatom.errors import CheckpointError, ConfigError
from sdatom.train import diffusion_loss, sample_generator, train

SUBJECT = os.path.join(os.path.dirname(__file__), "..", "data", "toy")


def _config(tmp_path, name="run", **kw):
    base = dict(
        subject=SUBJECT,
        class_name="toy",
        model="tiny",
        resolution=32,
        steps=4,
        prior=False,
        report_to="none",
        checkpoint_every=0,
        output=str(tmp_path / name),
    )
    return TrainConfig(**{**base, **kw})


def _tensors(path):
    return load_file(str(path))


def _assert_same_tensors(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# ----------------------------------------------------------------------------- the loss


class _ZeroUNet(torch.nn.Module):
    """Predicts zeros: the loss is then the mean square of the target, row by row."""

    def forward(self, x, t, encoder_hidden_states=None, **kwargs):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def _scheduler(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )


def _expected_rows(scheduler, moments, gens_seed, prediction_type):
    """Redo the loss's draws by hand: latent sample, noise, timestep, then the target."""
    rows = []
    for r in range(moments.shape[0]):
        g = sample_generator(*gens_seed, r)
        mean, logvar = moments[r : r + 1].chunk(2, dim=1)
        draw = torch.randn(mean.shape[1:], generator=g)
        latents = (mean + torch.exp(0.5 * logvar) * draw) * 0.5
        noise = torch.randn(latents.shape[1:], generator=g)[None]
        t = torch.randint(0, 1000, (), generator=g)[None]
        if prediction_type == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(latents, noise, t)
        rows.append(target.pow(2).mean())
    return torch.stack(rows)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_targets_follow_the_scheduler(prediction_type):
    scheduler = _scheduler(prediction_type)
    moments = torch.randn(2, 8, 4, 4)
    is_prior = torch.tensor([False, False])
    gens = [sample_generator(0, 1, 0, r) for r in range(2)]
    loss = diffusion_loss(
        _ZeroUNet(),
        scheduler,
        moments,
        torch.zeros(2, 77, 8),
        is_prior,
        gens,
        TrainConfig(subject="x", class_name="y"),
        0.5,
    )
    expected = _expected_rows(scheduler, moments, (0, 1, 0), prediction_type).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_finite_at_zero_terminal_snr(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,  # the shipped toy model's schedule
        prediction_type=prediction_type,
    )
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    moments = torch.randn(1, 8, 2, 2)

    def draws(row):  # the loss's draws for one row, in its order: latent sample, noise, t
        g = sample_generator(0, 0, 0, row)
        torch.randn(4, 2, 2, generator=g)
        return torch.randn(4, 2, 2, generator=g), int(torch.randint(0, 1000, (), generator=g))

    row = next(r for r in range(20_000) if draws(r)[1] == 999)  # the row drawn at t = T
    config = TrainConfig(subject="x", class_name="y", snr_gamma=5.0)
    loss = diffusion_loss(
        _ZeroUNet(),
        scheduler,
        moments,
        torch.zeros(1, 77, 8),
        torch.tensor([False]),
        [sample_generator(0, 0, 0, row)],
        config,
        0.5,
    )
    noise, _ = draws(row)
    # epsilon: weight min(snr, 5) / snr -> 1 as snr -> 0; v: min(snr, 5) / (snr + 1) = 0.
    want = noise.pow(2).mean() if prediction_type == "epsilon" else torch.tensor(0.0)
    assert torch.isfinite(loss) and torch.allclose(loss, want, rtol=1e-5)


def test_prior_loss_is_instance_mean_plus_weighted_class_mean():
    scheduler = _scheduler("epsilon")
    moments = torch.randn(4, 8, 4, 4)
    is_prior = torch.tensor([False, False, True, True])
    gens = [sample_generator(3, 0, 0, r) for r in range(4)]
    config = TrainConfig(subject="x", class_name="y", prior_loss_weight=0.25)
    loss = diffusion_loss(
        _ZeroUNet(), scheduler, moments, torch.zeros(4, 77, 8), is_prior, gens, config, 0.5
    )
    rows = _expected_rows(scheduler, moments, (3, 0, 0), "epsilon")
    assert torch.allclose(loss, rows[:2].mean() + 0.25 * rows[2:].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- training


def _fixed_batch_loss(unet, pipe, resolution):
    """The loss on a fixed evaluation batch: the subject photos, fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    from sdatom.data import DreamBoothDataset, Encoders, collate_dreambooth

    ds = DreamBoothDataset(SUBJECT, token="sks", class_name="toy", resolution=resolution)
    batch = collate_dreambooth([ds[i] for i in range(len(ds))], False)
    enc = Encoders(pipe, torch.device("cpu"), cache=False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    config = TrainConfig(subject="x", class_name="y")
    losses = []
    with torch.no_grad():
        for rep in range(4):
            gens = [sample_generator(1234, rep, 0, r) for r in range(len(ds))]
            losses.append(
                diffusion_loss(
                    unet,
                    scheduler,
                    enc.latent_moments(batch["pixels"]),
                    enc.prompts(batch["prompts"]),
                    batch["is_prior"],
                    gens,
                    config,
                    pipe.vae.config.scaling_factor,
                )
            )
    return torch.stack(losses).mean().item()


@pytest.mark.slow  # a subprocess or a long run: make test, not test-fast
def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path, tiny_dir):
    from sdatom.models import load_pipeline

    pipe = load_pipeline(str(tiny_dir))
    before = _fixed_batch_loss(pipe.unet, pipe, 32)
    result = train(_config(tmp_path, steps=40, lr=3e-3, batch_size=5), progress_bar=False)
    after = _fixed_batch_loss(result.unet.eval(), pipe, 32)
    assert after < before * 0.97, (before, after)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["trainable_params"] == result.trainable_params > 0
    assert summary["steps"] == 40


def test_only_atoms_change_and_base_weights_stay_bit_identical(tmp_path, tiny_dir):
    from sdatom.models import load_pipeline

    base = load_pipeline(str(tiny_dir)).unet.state_dict()
    result = train(_config(tmp_path, steps=3, lr=1e-2), progress_bar=False)
    trained = result.unet.state_dict()
    for key, value in base.items():
        match = [k for k in trained if k.replace("base_layer.", "") == key]
        assert len(match) == 1, key
        assert torch.equal(trained[match[0]], value), key
    atoms = _tensors(result.adapter)
    trained = {k: v for k, v in atoms.items() if not k.endswith(".atoms_d0")}  # D0 is frozen
    assert trained and all(k.endswith(".atoms_delta") for k in trained)
    assert any(v.abs().max() > 0 for v in trained.values())  # zero-initialised, then trained


def test_resume_finishes_with_the_same_adapter(tmp_path):
    common = dict(
        steps=6,
        checkpoint_every=2,
        keep_checkpoints=5,
        lr=1e-2,
        hflip=0.5,
        prior=True,
        num_class_images=3,
        class_sample_steps=2,
    )
    whole = train(_config(tmp_path, "whole", **common), progress_bar=False)
    # The same run, "killed" after its step-4 checkpoint: the files written later are gone.
    cut = train(_config(tmp_path, "cut", **common), progress_bar=False)
    run = cut.output
    for name in ("adapter.safetensors", "train_summary.json"):
        (run / name).unlink()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000006")
    resumed = train(_config(tmp_path, "cut", **common), resume="latest", progress_bar=False)
    assert resumed.steps == 6
    _assert_same_tensors(_tensors(whole.adapter), _tensors(resumed.adapter), atol=1e-6)


def test_resume_refuses_a_changed_config(tmp_path):
    train(_config(tmp_path, steps=2, checkpoint_every=1), progress_bar=False)
    (tmp_path / "run" / "train_summary.json").unlink()
    with pytest.raises(CheckpointError, match="different lr"):
        train(_config(tmp_path, steps=2, checkpoint_every=1, lr=0.5), resume="latest")


def test_a_run_stopped_before_its_first_checkpoint_gets_advice_that_works(tmp_path):
    from sdatom.errors import UsageError

    train(_config(tmp_path, steps=1), progress_bar=False)
    run = tmp_path / "run"
    for name in ("train_summary.json", "adapter.safetensors"):  # "killed" before the end
        (run / name).unlink()
    with pytest.raises(UsageError) as again:
        train(_config(tmp_path, steps=1), progress_bar=False)
    assert "--overwrite" in str(again.value) and "--resume" not in str(again.value)
    with pytest.raises(CheckpointError) as resumed:
        train(_config(tmp_path, steps=1), resume="latest", progress_bar=False)
    assert "--overwrite" in str(resumed.value)
    assert train(_config(tmp_path, steps=1), overwrite=True, progress_bar=False).steps == 1


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_resume_refuses_new_steps_with_a_schedule_that_depends_on_them(tmp_path, schedule):
    train(_config(tmp_path, steps=2, checkpoint_every=1, lr_scheduler=schedule), progress_bar=False)
    (tmp_path / "run" / "train_summary.json").unlink()
    cfg = _config(tmp_path, steps=4, checkpoint_every=1, lr_scheduler=schedule)
    with pytest.raises(CheckpointError, match="--steps 4 differs from the run's 2"):
        train(cfg, resume="latest", progress_bar=False)


def test_resume_may_change_steps_with_a_constant_schedule(tmp_path):
    train(_config(tmp_path, steps=2, checkpoint_every=1), progress_bar=False)
    (tmp_path / "run" / "train_summary.json").unlink()
    result = train(_config(tmp_path, steps=3, checkpoint_every=1), resume="latest")
    assert result.steps == 3


def test_seed_seeds_the_lora_initialisation(tiny_dir):
    from sdatom.methods import get_method
    from sdatom.models import load_pipeline

    def lora_init(seed, global_seed):
        unet = load_pipeline(str(tiny_dir)).unet
        torch.manual_seed(global_seed)  # a fresh process starts its global RNG at random
        lora = get_method("lora")
        lora.add(unet, TrainConfig(subject="x", class_name="y", method="lora", seed=seed))
        return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}

    a, b, c = lora_init(0, 11), lora_init(0, 22), lora_init(1, 11)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoints_rotate_to_keep_the_newest(tmp_path):
    from sdatom.checkpoint import list_checkpoints

    train(_config(tmp_path, steps=5, checkpoint_every=1, keep_checkpoints=2), progress_bar=False)
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert steps == [4, 5]


def test_validation_samples_and_tensorboard_logs(tmp_path):
    train(
        _config(tmp_path, steps=2, validation_every=2, validation_steps=2, report_to="tensorboard"),
        progress_bar=False,
    )
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "samples" / "step-000002").iterdir()) == [
        "p000-i00.png",
        "p000-i01.png",
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*")).parent))
    logs.Reload()
    assert "loss" in logs.Tags()["scalars"] and "lr" in logs.Tags()["scalars"]
    assert "validation" in logs.Tags()["images"][0]
    saved = load_config(run / "config.yaml")
    assert saved.resolution == 32 and saved.lr == 1e-4 and saved.model == "tiny"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baseline_methods_train_and_save(tmp_path, method):
    result = train(_config(tmp_path, steps=2, method=method, lr=1e-3), progress_bar=False)
    if method == "lora":
        keys = _tensors(result.adapter).keys()
        assert keys and all("lora" in k for k in keys)
        assert result.trainable_params == sum(
            p.numel() for n, p in result.unet.named_parameters() if "lora" in n
        )
    else:
        assert (result.output / "unet" / "config.json").is_file()
        assert result.trainable_params == sum(p.numel() for p in result.unet.parameters())


def test_min_snr_weighting_scales_each_row():
    from sdatom.train import snr_of

    scheduler = _scheduler("epsilon")
    moments = torch.randn(3, 8, 4, 4)
    gens = [sample_generator(5, 0, 0, r) for r in range(3)]
    args = (_ZeroUNet(), scheduler, moments, torch.zeros(3, 77, 8), torch.zeros(3, dtype=bool))
    plain = TrainConfig(subject="x", class_name="y")
    weighted = TrainConfig(subject="x", class_name="y", snr_gamma=5.0)
    rows = _expected_rows(scheduler, moments, (5, 0, 0), "epsilon")
    t = torch.stack([_timestep(5, r) for r in range(3)])
    snr = snr_of(scheduler, t)
    expected = (rows * torch.clamp(snr, max=5.0) / snr).mean()
    gens2 = [sample_generator(5, 0, 0, r) for r in range(3)]
    assert torch.allclose(diffusion_loss(*args, gens, plain, 0.5), rows.mean(), rtol=1e-5)
    assert torch.allclose(diffusion_loss(*args, gens2, weighted, 0.5), expected, rtol=1e-5)


def _timestep(seed, row):
    g = sample_generator(seed, 0, 0, row)
    torch.randn(4, 4, 4, generator=g), torch.randn(4, 4, 4, generator=g)
    return torch.randint(0, 1000, (), generator=g)


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    plain = train(_config(tmp_path, "plain", steps=2, lr=1e-3), progress_bar=False)
    ckpt = train(
        _config(tmp_path, "ckpt", steps=2, lr=1e-3, gradient_checkpointing=True),
        progress_bar=False,
    )
    _assert_same_tensors(_tensors(plain.adapter), _tensors(ckpt.adapter), atol=1e-6)


def test_bf16_mixed_precision_keeps_atoms_in_fp32(tmp_path):
    from sdatom.atoms import trainable_parameters

    result = train(_config(tmp_path, steps=2, mixed_precision="bf16"), progress_bar=False)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(result.unet))
    assert result.unet.conv_in.base_layer.weight.dtype == torch.bfloat16


def test_mixed_precision_not_set_follows_accelerate_and_is_recorded(tmp_path, monkeypatch):
    # What `accelerate launch --mixed_precision bf16` or a saved `accelerate config` sets.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert TrainConfig().mixed_precision is None
    result = train(_config(tmp_path, "env", steps=1), progress_bar=False)
    assert result.unet.conv_in.base_layer.weight.dtype == torch.bfloat16
    assert load_config(tmp_path / "env" / "config.yaml").mixed_precision == "bf16"
    assert result.summary["mixed_precision"] == "bf16"
    # --mixed-precision, when given, still wins over accelerate's setting.
    result = train(_config(tmp_path, "flag", steps=1, mixed_precision="no"), progress_bar=False)
    assert result.unet.conv_in.base_layer.weight.dtype == torch.float32
    assert load_config(tmp_path / "flag" / "config.yaml").mixed_precision == "no"
    assert result.summary["mixed_precision"] == "no"


def test_class_images_use_the_training_precision_on_gpus():
    from types import SimpleNamespace

    from sdatom.data import class_image_precision

    def acc(device, mp):
        return SimpleNamespace(device=torch.device(device), mixed_precision=mp)

    assert class_image_precision(acc("cuda", "fp16")) == "fp16"
    assert class_image_precision(acc("cuda", "bf16")) == "bf16"
    assert class_image_precision(acc("cuda", "no")) == "fp32"
    assert class_image_precision(acc("cpu", "bf16")) == "fp32"


def _two_process_worker(cfg_dict):
    from accelerate import Accelerator, PartialState
    from safetensors.torch import save_file

    from sdatom.atoms import atom_state_dict
    from sdatom.config import TrainConfig

    PartialState._reset_state()  # forked from a process that already ran single-process runs
    prepared = []
    original = Accelerator.prepare_model

    def prepare_model(self, model, *args, **kwargs):  # records how DDP wrapped the UNet
        wrapped = original(self, model, *args, **kwargs)
        prepared.append(getattr(wrapped, "broadcast_buffers", None))
        return wrapped

    Accelerator.prepare_model = prepare_model
    try:
        result = train(TrainConfig.from_dict(cfg_dict), progress_bar=False)
    finally:
        Accelerator.prepare_model = original
    rank = PartialState().process_index
    with open(os.path.join(cfg_dict["output"], f"ddp{rank}.json"), "w") as f:
        json.dump(prepared, f)
    state = {k: v.contiguous() for k, v in atom_state_dict(result.unet).items()}
    save_file(state, os.path.join(cfg_dict["output"], f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    from accelerate import debug_launcher

    one = train(_config(tmp_path, "one", steps=2, batch_size=2, lr=1e-3), progress_bar=False)
    two_cfg = _config(tmp_path, "two", steps=2, batch_size=1, lr=1e-3).to_dict()
    debug_launcher(_two_process_worker, args=(two_cfg,), num_processes=2)
    rank0 = _tensors(tmp_path / "two" / "rank0.safetensors")
    rank1 = _tensors(tmp_path / "two" / "rank1.safetensors")
    _assert_same_tensors(rank0, rank1, atol=0)
    # DDP wrapped the UNet without re-broadcasting its (frozen) buffers every step.
    for rank in (0, 1):
        assert json.loads((tmp_path / "two" / f"ddp{rank}.json").read_text()) == [False]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2
    _assert_same_tensors(
        _tensors(one.adapter), _tensors(tmp_path / "two" / "adapter.safetensors"), 1e-5
    )
    changed = _tensors(one.adapter)
    assert any(v.abs().max() > 1e-4 for k, v in changed.items() if "d0" not in k)


@pytest.mark.slow
def test_real_sd15_architecture_trains_two_steps(tmp_path):
    result = train(
        _config(tmp_path, model="random:sd15", resolution=64, steps=2, preset="atoms-attn"),
        progress_bar=False,
    )
    assert result.trainable_params == 37_026  # = the Jacobian rank (test_atoms_dof.py)
    assert result.adapter.is_file()


# ----------------------------------------------------------------------------- configs


def test_config_file_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nlr: 0.001\nresolution: 256\n")
    config = build_config(path, steps=9, lr=None)
    assert (config.steps, config.lr, config.resolution) == (9, 0.001, 256)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("stepz: 3\n", "unknown key 'stepz'; did you mean 'steps'"),
        ("steps: three\n", "steps must be int"),
        ("resolution: 100\n", "resolution: must be a positive multiple of 8"),
        ("steps: -2\n", "steps: must be a positive integer"),
        ("lr: 0\n", "lr: must be a positive number"),
        ("method: dreambooth\n", "method: must be one of atoms, lora, full"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
    ],
)
def test_bad_config_files(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("name", ["tiny", "sd15", "sd21", "sdxl"])
def test_shipped_configs_are_valid(name):
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    config = load_config(os.path.join(root, f"{name}.yaml"))
    assert config.method == "atoms"


@pytest.mark.slow
def test_accelerate_launch_runs_two_cpu_processes(tmp_path):
    """The real launcher, as a user types it (DESIGN §3: --multi_gpu starts 2 gloo processes)."""
    import subprocess
    import sys

    one = train(_config(tmp_path, "one", steps=2, batch_size=2, lr=1e-3), progress_bar=False)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    args = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "sdatom",
        "train",
        "--subject",
        SUBJECT,
        "--class-name",
        "toy",
        "--model",
        "tiny",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--lr",
        "1e-3",
        "--no-prior",
        "--report-to",
        "none",
        "--checkpoint-every",
        "0",
        "--output",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("adapter:") == 1  # one report, from the main process
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2
    _assert_same_tensors(
        _tensors(one.adapter), _tensors(tmp_path / "two" / "adapter.safetensors"), 1e-5
    )
