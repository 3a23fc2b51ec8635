"""DreamBooth-style training of filter atoms (or LoRA / full fine-tuning baselines).

Reads top to bottom: check the run before loading anything, plan it (every derived value once,
in :class:`RunPlan`), build the model with the method's trainable parameters, prepare the data,
then one accelerate loop with resumable checkpoints. What a method does lives in
``sdatom.methods``, the data pieces in ``sdatom.data``, resume checks in ``sdatom.checkpoint``.
Runs unchanged under ``accelerate launch`` on any number of processes: the adapter's
parameters are real submodules of the UNet that accelerate wraps, so their gradients are
synchronised, and only the main process writes files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdatom import __version__, token_embedding
from sdatom.checkpoint import Progress, find_resume, prune_checkpoints, save_checkpoint
from sdatom.config import MIXED_PRECISION, TrainConfig, dump_config
from sdatom.errors import ConfigError, Interrupted, TrainingError, UsageError
from sdatom.fileio import atomic_write_text
from sdatom.methods import Method, get_method
from sdatom.runs import CONFIG_FILE, SUMMARY_FILE
from sdatom.stopping import StopSignals, step_status

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunPlan:
    """Everything derived from the user's config, computed once before training.

    ``config`` is the resolved config (every default filled: method defaults, the output
    folder, the model's resolution, the precision accelerate chose): what ``config.yaml`` and
    each checkpoint record. The user's config is never changed during the run.
    """

    config: TrainConfig
    output: Path
    subject_images: tuple[Path, ...]
    method: Method
    weight_dtype: torch.dtype


def _model_of(config: TrainConfig) -> str:
    from sdatom.models import default_model

    return config.model or default_model()


def _output_of(config: TrainConfig) -> Path:
    return Path(config.output or Path("runs") / Path(config.subject).resolve().name)


def check_run(config: TrainConfig, *, resume: str | None, overwrite: bool) -> tuple[Path, ...]:
    """Fail before any loading: required options, the method's options, the subject folder
    and the output folder (a finished run is never overwritten silently, and an unfinished
    one is resumed only when asked). Returns the subject images (listed once)."""
    from sdatom.checkpoint import list_checkpoints
    from sdatom.data import find_images

    if config.subject is None:
        raise ConfigError("--subject: give the folder of subject photos")
    if config.class_name is None or not config.class_name.strip():
        raise ConfigError(
            "--class-name: say what the subject is (e.g. --class-name dog); it is never guessed"
        )
    get_method(config.method).check_config(config)
    # Listed once (its warnings printed once); a missing or empty folder fails before loading.
    subject_images = tuple(find_images(config.subject))
    output = _output_of(config)
    finished = (output / SUMMARY_FILE).is_file()
    started = (output / CONFIG_FILE).is_file()
    if resume is None and (finished or started) and not overwrite:
        if finished:
            what, hint = "a finished run", ""
        elif list_checkpoints(output):
            what, hint = "an unfinished run", " or --resume latest to continue it"
        else:  # stopped before its first checkpoint: nothing to resume
            what, hint = "an unfinished run with no checkpoint", " (that starts it again)"
        raise UsageError(
            f"--output {output} already holds {what}: pass --overwrite to replace it{hint}"
        )
    if output.is_dir() and not started and any(output.iterdir()):
        raise UsageError(
            f"--output {output} is a folder with other files in it: choose a new or empty folder"
        )
    if resume is not None and finished and not overwrite:
        raise UsageError(f"--output {output} holds a finished run; nothing to resume")
    return subject_images


def plan_run(
    config: TrainConfig,
    subject_images: tuple[Path, ...],
    *,
    mixed_precision: str,
    native_resolution: int,
) -> RunPlan:
    """Resolve every default once: those that depend on other options, on the model (its
    resolution) and on accelerate (the precision it runs in)."""
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(
            f"mixed precision {mixed_precision!r} (from accelerate's settings) is not supported: "
            f"use one of {', '.join(MIXED_PRECISION)}"
        )
    method = get_method(config.method)
    model = _model_of(config)
    tiny = model == "tiny"
    resolved = config.replace(
        model=model,
        output=str(_output_of(config)),
        lr=config.lr or method.default_lr,
        num_class_images=config.num_class_images or (8 if tiny else 100),
        class_sample_steps=config.class_sample_steps or (4 if tiny else 30),
        # Without a class (per-image captions), the token alone: never "sks None".
        validation_prompts=config.validation_prompts
        or (" ".join(["a photo of", config.token, *filter(None, [config.class_name])]),),
        mixed_precision=mixed_precision,
        resolution=config.resolution or native_resolution,
    )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return RunPlan(
        config=resolved,
        output=Path(resolved.output),
        subject_images=subject_images,
        method=method,
        weight_dtype=weight_dtype[mixed_precision],
    )


# ----------------------------------------------------------------------------- the loss


def sample_generator(seed: int, step: int, micro: int, row: int) -> torch.Generator:
    """The RNG of one training row: the same whatever the process count, so 2 processes ×
    batch 1 draw exactly what 1 process × batch 2 draws."""
    key = hashlib.sha256(f"sdatom-noise:{seed}:{step}:{micro}:{row}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: Any,
    moments: torch.Tensor,
    embeddings: torch.Tensor | dict[str, Any],
    is_prior: torch.Tensor,
    generators: list[torch.Generator],
    config: TrainConfig,
    scaling_factor: float,
) -> torch.Tensor:
    """The DreamBooth loss: MSE to the noise (or velocity) target, instance rows plus
    ``prior_loss_weight`` × class rows, with optional min-SNR weighting and noise offset.

    ``embeddings``: the text hidden states, or the UNet's conditioning keyword arguments
    (:meth:`sdatom.data.Encoders.unet_kwargs`; SDXL adds pooled embeddings and size ids).
    """
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    draws = [torch.randn(mean.shape[1:], generator=g) for g in generators]
    latents = (mean + std * torch.stack(draws).to(mean.device)) * scaling_factor
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    if config.noise_offset:
        offset = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators])
        noise = noise + config.noise_offset * offset
    noise = noise.to(latents.device)
    n_train = scheduler.config.num_train_timesteps
    t = torch.stack([torch.randint(0, n_train, (), generator=g) for g in generators])
    t = t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ConfigError(f"the model's scheduler predicts {prediction_type!r}: not supported")
    # Inputs stay fp32: under mixed precision accelerate runs the UNet in autocast.
    cond = embeddings if isinstance(embeddings, dict) else {"encoder_hidden_states": embeddings}
    pred = unet(noisy, t, **cond).sample
    per_row = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma is not None:
        # Floored: on a zero-terminal-SNR schedule snr(T) = 0, where epsilon's weight tends to 1.
        snr = snr_of(scheduler, t).clamp(min=torch.finfo(torch.float32).tiny)
        weight = torch.clamp(snr, max=config.snr_gamma) / snr
        if prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=config.snr_gamma) / (snr + 1)
        per_row = per_row * weight
    loss = per_row[~is_prior].mean()
    if is_prior.any():
        loss = loss + config.prior_loss_weight * per_row[is_prior].mean()
    return loss


def snr_of(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of timesteps ``t`` (Min-SNR weighting, Hang et al. 2023)."""
    alphas = scheduler.alphas_cumprod.to(t.device)[t].float()
    return alphas / (1 - alphas)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a finished run produced."""

    output: Path
    adapter: Path
    steps: int
    train_seconds: float
    trainable_params: int
    final_loss: float
    summary: dict[str, Any] = field(default_factory=dict)
    unet: torch.nn.Module | None = field(default=None, repr=False)  # the trained UNet
    main_process: bool = True  # False on the other processes of a multi-process run


def make_accelerator(config: TrainConfig, output: Path):
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # train() may run several times in one process (a notebook, the tests): start each run
    # from its own settings. The distributed state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    report_to = None if config.report_to == "none" else config.report_to
    cpu = not torch.cuda.is_available() or (config.device or "").startswith("cpu")
    return Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output), logging_dir=str(output / "logs")
        ),
        cpu=cpu,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout)),
            # The UNet's buffers never change (no batch norm; the atoms' D0 and coefficient
            # buffers are frozen, ~3.9 GB with the lasso coder on SD-1.5): DDP's default would
            # re-broadcast all of them every step.
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )


def _optimizer(groups: list[dict[str, Any]], config: TrainConfig, lr: float):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--use-8bit-adam needs bitsandbytes: pip install 'sdatom[bnb]'")
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.adam_weight_decay)


def train(
    config: TrainConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress_bar: bool = True,
) -> TrainResult:
    """Train the configured adapter on a subject folder and write the run folder.

    ``resume``: ``"latest"`` or a checkpoint folder, to continue an interrupted run exactly.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from sdatom.data import Encoders, class_images
    from sdatom.families import family_of
    from sdatom.models import enable_xformers, load_pipeline

    subject_images = check_run(config, resume=resume, overwrite=overwrite)
    accelerator = make_accelerator(config, _output_of(config))
    # Every process has checked the output folder (check_run) before any process writes to it.
    accelerator.wait_for_everyone()
    pipe = load_pipeline(
        _model_of(config),
        dtype="fp32",
        device=accelerator.device,
        config=config.model_config,
        vae=config.vae,
    )
    family = family_of(pipe)
    if config.train_token:  # before class images are made: a multi-piece token fails now
        token_embedding.token_ids(pipe, config.token)
    # Not set: accelerate's own setting (launch flag, config file, environment) applied;
    # config.yaml records the precision actually used, and the model's native resolution.
    plan = plan_run(
        config,
        subject_images,
        mixed_precision=accelerator.mixed_precision,
        native_resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor,
    )
    c, method, weight_dtype = plan.config, plan.method, plan.weight_dtype
    checkpoint = find_resume(plan.config, plan.output, resume)
    if accelerator.is_main_process:
        if overwrite and resume is None and plan.output.exists():
            shutil.rmtree(plan.output)
        plan.output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.output / CONFIG_FILE, dump_config(c))
    accelerator.wait_for_everyone()

    # -- build: the base model, frozen, with the method's trainable parameters
    if c.xformers:
        enable_xformers(pipe, accelerator.device)
    text_encoders = family.text_encoders(pipe)
    pipe.vae.requires_grad_(False)
    for encoder in text_encoders:
        encoder.requires_grad_(False)
    images = class_images(c, pipe, accelerator, progress_bar)
    unet = pipe.unet
    params = method.add(unet, c)
    if method.freezes_base and weight_dtype != torch.float32:
        # Frozen weights in the compute dtype; trainable parameters stay in fp32.
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
    pipe.vae.to(dtype=family.vae_dtype(pipe, weight_dtype, custom_vae=bool(c.vae)))
    for encoder in text_encoders:
        encoder.to(dtype=weight_dtype)
    # After the cast: the token's vectors start from the rows the frozen encoders would use.
    token_params = token_embedding.attach(pipe, c.token, c.token_vectors) if c.train_token else []
    if c.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable_count = method.count(params) + sum(v.numel() for v in token_params)

    # -- data
    dataset, sampler, loader = _data(plan, images)
    encoders = Encoders(
        pipe,
        accelerator.device,
        c.cache_latents,
        live_token=c.token if c.train_token else None,
        token_vectors=c.token_vectors,
    )
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # -- optimizer and schedule (accelerate steps the scheduler once per process)
    groups = [{"params": params}]
    if token_params:
        # No weight decay: it would pull the token back towards the near-zero row that the
        # text encoder ignores.
        groups.append({"params": token_params, "lr": c.token_lr, "weight_decay": 0.0})
    optimizer = _optimizer(groups, c, c.lr)
    lr_scheduler = get_scheduler(
        c.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=c.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=c.steps * accelerator.num_processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, loader, lr_scheduler
    )
    batches_per_epoch = len(loader)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / c.grad_accum))
    num_epochs = math.ceil(c.steps / steps_per_epoch)

    # -- resume
    progress = Progress(step=0, epoch=0, batches_in_epoch=0)
    if checkpoint is not None:
        trainable, token_state = token_embedding.split_checkpoint(checkpoint.trainable)
        method.load_state_dict(accelerator.unwrap_model(unet), trainable)
        if token_params:
            token_embedding.load_state_dict(pipe, token_state)
        checkpoint.restore(optimizer, lr_scheduler, accelerator.scaler)
        progress = checkpoint.progress
        logger.info("resumed from %s at step %d", checkpoint.path, progress.step)
    if accelerator.is_main_process and c.report_to != "none":
        accelerator.init_trackers("sdatom", config=_flat_for_trackers(c))

    # -- loop
    bar = tqdm(
        total=c.steps,
        initial=progress.step,
        disable=not (progress_bar and accelerator.is_local_main_process),
        desc="train",
        dynamic_ncols=True,
    )
    step = progress.step
    train_seconds = 0.0
    last_loss = float("nan")
    unet.train()
    try:
        with StopSignals() as interrupt:
            for epoch in range(progress.epoch, num_epochs):
                if step >= c.steps:
                    break
                skip = progress.batches_in_epoch if epoch == progress.epoch else 0
                epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
                # accelerate's loaders count their own iterations and set the epoch from that
                # count when iterated; a resumed run must set it from the real epoch instead.
                if hasattr(epoch_loader, "set_epoch"):
                    epoch_loader.set_epoch(epoch)
                sampler.set_epoch(epoch)
                dataset.set_epoch(epoch)
                batch_index = skip
                for batch in epoch_loader:
                    started = time.perf_counter()
                    micro = batch_index % c.grad_accum
                    with accelerator.accumulate(unet):
                        loss = _loss_of_batch(
                            batch,
                            unet,
                            noise_scheduler,
                            encoders,
                            pipe,
                            c,
                            accelerator,
                            step,
                            micro,
                        )
                        status = step_status(loss, interrupt, accelerator)
                        if status["nonfinite"]:
                            _stop_on_nonfinite(plan, step)
                        accelerator.backward(loss)
                        if token_params and accelerator.sync_gradients:
                            _average_across_processes(token_params, accelerator)
                        if accelerator.sync_gradients and c.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params + token_params, c.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    batch_index += 1
                    train_seconds += time.perf_counter() - started
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    last_loss = loss.detach().item()
                    lr = lr_scheduler.get_last_lr()[0]
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                    accelerator.log({"loss": last_loss, "lr": lr}, step=step)
                    here = Progress(step, epoch, batch_index)
                    if c.validation_every and step % c.validation_every == 0:
                        validate(pipe, accelerator.unwrap_model(unet), plan, accelerator, step)
                    interrupted = status["interrupted"]
                    if (c.checkpoint_every and step % c.checkpoint_every == 0) or interrupted:
                        path = _save_checkpoint(
                            plan, accelerator, unet, optimizer, lr_scheduler, here, pipe
                        )
                        if interrupted:
                            what = "terminated (SIGTERM)" if status["terminated"] else "interrupted"
                            raise Interrupted(
                                f"{what} at step {step}; checkpoint saved in {path}. Continue "
                                f"with the same command plus --resume latest",
                                terminated=status["terminated"],
                                report=accelerator.is_main_process,
                            )
                    if step >= c.steps:
                        break
    finally:  # an error message then starts on its own line
        bar.close()

    # -- save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter = method.save(accelerator.unwrap_model(unet), plan.output, c, pipe)
        if c.train_token:
            token_embedding.save(pipe, plan.output / token_embedding.EMBEDDING_FILE, c.token)
        summary = _write_summary(
            plan,
            trainable_params=trainable_count,
            adapter_bytes=_size(adapter),
            train_seconds=round(train_seconds, 3),
            seconds_per_step=round(train_seconds / max(1, step - progress.step), 4),
            steps=step,
            final_loss=last_loss,
            processes=accelerator.num_processes,
        )
    else:  # other processes report the same run without writing it
        adapter, summary = plan.output / method.result_name, {}
    accelerator.end_training()
    return TrainResult(
        plan.output,
        adapter,
        step,
        train_seconds,
        trainable_count,
        last_loss,
        summary,
        unet=accelerator.unwrap_model(unet),
        main_process=accelerator.is_main_process,
    )


def _data(plan: RunPlan, class_images: list[Path] | None):
    """The dataset, its resumable order and the loader (accelerate shards it later)."""
    from sdatom.data import DreamBoothDataset, EpochSampler, collate_dreambooth

    c = plan.config
    dataset = DreamBoothDataset(
        list(plan.subject_images),
        token=c.token,
        class_name=c.class_name,
        resolution=c.resolution,
        class_images=class_images,
        center_crop=c.center_crop,
        hflip_prob=c.hflip,
        seed=c.seed,
    )
    sampler = EpochSampler(len(dataset), c.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=c.batch_size,
        sampler=sampler,
        collate_fn=lambda ex: collate_dreambooth(ex, dataset.with_prior),
    )
    return dataset, sampler, loader


def _write_summary(plan: RunPlan, **measured: Any) -> dict[str, Any]:
    """Write ``train_summary.json``: what ran (from the plan) and what it measured."""
    c = plan.config
    summary = {
        "method": c.method,
        "preset": plan.method.preset(c),
        "model": c.model,
        **measured,
        "token": c.token,
        "train_token": c.train_token,
        "token_vectors": c.token_vectors if c.train_token else None,
        "class_name": c.class_name,
        "subject": str(c.subject),
        "mixed_precision": c.mixed_precision,
        "sdatom_version": __version__,
    }
    atomic_write_text(plan.output / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary


def _loss_of_batch(batch, unet, scheduler, encoders, pipe, c, accelerator, step, micro):
    rows = batch["pixels"].shape[0]
    n_inst = int((~batch["is_prior"]).sum())
    # Global row index: instance rows, then class rows, numbered as one process would.
    base = accelerator.process_index * n_inst
    gens = []
    for r in range(rows):
        prior = bool(batch["is_prior"][r])
        local = r - n_inst if prior else r
        gens.append(sample_generator(c.seed, step, micro, (base + local) * 2 + int(prior)))
    moments = encoders.latent_moments(batch["pixels"].cpu())
    # Each row (instance or class) gets its own prompt's conditioning and its own size ids.
    cond = encoders.unet_kwargs(batch["prompts"], batch["sizes"], c.resolution)
    return diffusion_loss(
        unet,
        scheduler,
        moments,
        cond,
        batch["is_prior"].to(moments.device),
        gens,
        c,
        pipe.vae.config.scaling_factor,
    )


def _average_across_processes(params: list[torch.nn.Parameter], accelerator) -> None:
    """Average the token vectors' gradients over processes, as DDP does for the UNet's (the
    text encoders are not wrapped by DDP)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        p.grad = accelerator.reduce(grad, reduction="mean")


def _stop_on_nonfinite(plan: RunPlan, step: int) -> None:
    """The loss is NaN/inf: stop before it reaches the parameters; checkpoints stay good."""
    c = plan.config
    kept = ""
    if c.checkpoint_every:
        from sdatom.checkpoint import list_checkpoints

        found = list_checkpoints(plan.output)
        kept = f"; the last good checkpoint is {found[-1][1]}" if found else ""
    raise TrainingError(
        f"the loss became non-finite at step {step + 1} (lr {c.lr:g}, mixed precision "
        f"{c.mixed_precision}): start again with a lower --lr (and --overwrite), or train in "
        f"fp32/bf16 instead of fp16; a checkpoint resumes with its own learning rate{kept}"
    )


def _save_checkpoint(plan, accelerator, unet, optimizer, lr_scheduler, progress: Progress, pipe):
    c = plan.config
    folder = plan.output / "checkpoints" / f"step-{progress.step:06d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainable = plan.method.state_dict(accelerator.unwrap_model(unet))
        if c.train_token:
            trainable |= token_embedding.checkpoint_state(pipe)
        save_checkpoint(
            folder,
            progress=progress,
            trainable=trainable,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            scaler=accelerator.scaler,
            config=c.to_dict(),
        )
        prune_checkpoints(plan.output, c.keep_checkpoints)
    accelerator.wait_for_everyone()
    return folder


def validate(pipe: Any, unet: torch.nn.Module, plan: RunPlan, accelerator, step: int) -> None:
    """Sample the validation prompts into ``samples/step-N/`` and show them in the trackers."""
    from sdatom.sample import validation_samples

    folder = plan.output / "samples" / f"step-{step:06d}"
    validation_samples(pipe, unet, plan.config, folder, accelerator)
    if accelerator.is_main_process:
        logger.info("step %d: validation samples in %s", step, folder)
        _log_images(accelerator, folder, step)


def _log_images(accelerator, folder: Path, step: int) -> None:
    """Show the validation samples in TensorBoard / W&B next to the loss curve."""
    import numpy as np
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    if not files or not accelerator.trackers:
        return
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": images}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": list(images)}, step)


def _flat_for_trackers(c: TrainConfig) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, int | float | str | bool) else str(v))
        for k, v in c.to_dict().items()
    }


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
