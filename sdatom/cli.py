"""The ``sdatom`` command: a thin Typer shell over the library.

Each command turns its options into library arguments, calls one library function and
prints the result. Errors the library raises on purpose (SdatomError) become one red line
and exit code 2 (bad input) or 1 (failed run); ``SDATOM_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import warnings
from pathlib import Path
from typing import Annotated

import typer

from sdatom import __version__
from sdatom.errors import Interrupted, SdatomError

app = typer.Typer(
    name="sdatom",
    help="Personalize Stable Diffusion by tuning filter atoms: train, sample, eval, compare, "
    "export and inspect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Options shared by several commands, declared once.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Base model (SD-1.x, SD-2.x or SDXL): a hub id, a local diffusers folder, a "
        ".safetensors/.ckpt file, 'toy' (the pretrained toy-world model), 'tiny', 'tiny-sdxl' or "
        "'random:sd15'/'random:sd21'/'random:sdxl'. Default: $SDATOM_MODEL or SD-1.5.",
        show_default=False,
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Atom preset: atoms, atoms-paper, atoms-oc, atoms-attn, or a YAML atom config file.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (which handles it itself, like Ctrl-C)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM; return the previous one (None off the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a test runner's worker thread)
        return None


def command(fn):
    """Register ``fn`` as a command whose SdatomErrors become one red line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = _on_sigterm(_raise_terminated)
        try:
            return fn(*args, **kwargs)
        except _Terminated:  # SIGTERM before or outside the training loop
            typer.secho("terminated; nothing was saved", fg=typer.colors.RED, err=True)
            raise typer.Exit(143)
        except KeyboardInterrupt:  # before or outside the training loop: nothing to save
            typer.secho("interrupted; nothing was saved", fg=typer.colors.RED, err=True)
            raise typer.Exit(Interrupted.exit_code)
        except SdatomError as e:
            if os.environ.get("SDATOM_DEBUG"):
                raise
            if getattr(e, "report", True):  # one message per multi-process run
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(e.exit_code)
        finally:
            _on_sigterm(previous)

    # A trailing underscore ("eval_") names a command without shadowing a builtin.
    return app.command(name=fn.__name__.rstrip("_"))(wrapper)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdatom {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Personalize Stable Diffusion by tuning filter atoms."""
    logging.basicConfig(level=os.environ.get("SDATOM_LOG", "WARNING"), format="%(message)s")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    # Deprecation chatter from the libraries underneath is not the user's business.
    warnings.filterwarnings("ignore", module="(diffusers|transformers|huggingface_hub|torch)")


@command
def inspect(
    model: ModelOpt = None,
    preset: PresetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the UNet's layer inventory (and a preset's trainable parameters) without weights."""
    from sdatom.inspection import format_inspection, inspect_model

    report = inspect_model(model, preset=preset)
    typer.echo(json.dumps(report, indent=2) if as_json else format_inspection(report))


def _field_option(name: str, *flags: str, **kw):
    """A Typer option whose help is the TrainConfig field's (documented once)."""
    from sdatom.config import field_help

    return typer.Option(*flags, help=field_help(name), show_default=False, **kw)


@command
def train(
    subject: Annotated[str | None, _field_option("subject", "--subject", "-s")] = None,
    class_name: Annotated[str | None, _field_option("class_name", "--class-name", "-c")] = None,
    model: ModelOpt = None,
    model_config: Annotated[str | None, _field_option("model_config", "--model-config")] = None,
    vae: Annotated[str | None, _field_option("vae", "--vae")] = None,
    output: Annotated[str | None, _field_option("output", "--output", "-o")] = None,
    method: Annotated[str | None, _field_option("method", "--method")] = None,
    preset: PresetOpt = None,
    token: Annotated[str | None, _field_option("token", "--token")] = None,
    train_token: Annotated[
        bool | None, _field_option("train_token", "--train-token/--no-train-token")
    ] = None,
    token_lr: Annotated[float | None, _field_option("token_lr", "--token-lr")] = None,
    token_vectors: Annotated[int | None, _field_option("token_vectors", "--token-vectors")] = None,
    steps: Annotated[int | None, _field_option("steps", "--steps")] = None,
    resolution: Annotated[int | None, _field_option("resolution", "--resolution")] = None,
    batch_size: Annotated[int | None, _field_option("batch_size", "--batch-size")] = None,
    grad_accum: Annotated[int | None, _field_option("grad_accum", "--grad-accum")] = None,
    lr: Annotated[float | None, _field_option("lr", "--lr")] = None,
    lr_scheduler: Annotated[str | None, _field_option("lr_scheduler", "--lr-scheduler")] = None,
    lr_warmup_steps: Annotated[
        int | None, _field_option("lr_warmup_steps", "--lr-warmup-steps")
    ] = None,
    seed: Annotated[int | None, _field_option("seed", "--seed")] = None,
    prior: Annotated[bool | None, _field_option("prior", "--prior/--no-prior")] = None,
    class_dir: Annotated[str | None, _field_option("class_dir", "--class-dir")] = None,
    num_class_images: Annotated[
        int | None, _field_option("num_class_images", "--num-class-images")
    ] = None,
    class_sample_steps: Annotated[
        int | None, _field_option("class_sample_steps", "--class-sample-steps")
    ] = None,
    class_batch_size: Annotated[
        int | None, _field_option("class_batch_size", "--class-batch-size")
    ] = None,
    prior_loss_weight: Annotated[
        float | None, _field_option("prior_loss_weight", "--prior-loss-weight")
    ] = None,
    center_crop: Annotated[
        bool | None, _field_option("center_crop", "--center-crop/--random-crop")
    ] = None,
    hflip: Annotated[float | None, _field_option("hflip", "--hflip")] = None,
    mixed_precision: Annotated[
        str | None, _field_option("mixed_precision", "--mixed-precision")
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None, _field_option("gradient_checkpointing", "--gradient-checkpointing")
    ] = None,
    cache_latents: Annotated[
        bool | None, _field_option("cache_latents", "--cache-latents/--no-cache-latents")
    ] = None,
    snr_gamma: Annotated[float | None, _field_option("snr_gamma", "--snr-gamma")] = None,
    noise_offset: Annotated[float | None, _field_option("noise_offset", "--noise-offset")] = None,
    max_grad_norm: Annotated[
        float | None, _field_option("max_grad_norm", "--max-grad-norm")
    ] = None,
    use_8bit_adam: Annotated[bool | None, _field_option("use_8bit_adam", "--use-8bit-adam")] = None,
    lora_rank: Annotated[int | None, _field_option("lora_rank", "--lora-rank")] = None,
    validation_prompt: Annotated[
        list[str] | None, _field_option("validation_prompts", "--validation-prompt")
    ] = None,
    validation_every: Annotated[
        int | None, _field_option("validation_every", "--validation-every")
    ] = None,
    checkpoint_every: Annotated[
        int | None, _field_option("checkpoint_every", "--checkpoint-every")
    ] = None,
    keep_checkpoints: Annotated[
        int | None, _field_option("keep_checkpoints", "--keep-checkpoints")
    ] = None,
    report_to: Annotated[str | None, _field_option("report_to", "--report-to")] = None,
    xformers: Annotated[bool | None, _field_option("xformers", "--xformers")] = None,
    device: Annotated[str | None, _field_option("device", "--device")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file of options; the CLI overrides it.")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue an interrupted run: 'latest' or a checkpoint."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already in --output.")
    ] = False,
) -> None:
    """Train atoms (or a LoRA / full baseline) on a folder of subject photos."""
    from sdatom.config import build_config
    from sdatom.train import train as run_training

    train_config = build_config(
        config,
        subject=subject,
        class_name=class_name,
        model=model,
        model_config=model_config,
        vae=vae,
        output=output,
        method=method,
        preset=preset,
        token=token,
        train_token=train_token,
        token_lr=token_lr,
        token_vectors=token_vectors,
        steps=steps,
        resolution=resolution,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps,
        seed=seed,
        prior=prior,
        class_dir=class_dir,
        num_class_images=num_class_images,
        class_batch_size=class_batch_size,
        class_sample_steps=class_sample_steps,
        prior_loss_weight=prior_loss_weight,
        center_crop=center_crop,
        hflip=hflip,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        cache_latents=cache_latents,
        snr_gamma=snr_gamma,
        noise_offset=noise_offset,
        max_grad_norm=max_grad_norm,
        use_8bit_adam=use_8bit_adam,
        lora_rank=lora_rank,
        validation_prompts=tuple(validation_prompt) if validation_prompt else None,
        validation_every=validation_every,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        report_to=report_to,
        xformers=xformers,
        device=device,
    )
    result = run_training(train_config, resume=resume, overwrite=overwrite)
    if not result.main_process:  # one report per run, not one per process
        return
    typer.echo(
        f"trained {result.trainable_params:,} parameters for {result.steps} steps "
        f"in {result.train_seconds:.1f} s\nadapter: {result.adapter}\nrun:     {result.output}"
    )


RunOpt = Annotated[
    Path | None,
    typer.Option("--run", "-r", help="Run folder written by `sdatom train` (runs/<name>)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="auto (fp16 on CUDA, fp32 on CPU and MPS), fp32, fp16 or bf16."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (none is shown in logs either).")
]


@command
def sample(
    run: RunOpt = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="A prompt (repeat the option for more prompts)."),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts-file", help="Text file: one prompt per line, # for comments."),
    ] = None,
    protocol: Annotated[
        bool,
        typer.Option("--protocol", help="sdatom's evaluation prompts for the run's subject."),
    ] = False,
    dreambench: Annotated[
        Path | None,
        typer.Option(
            "--dreambench",
            help="DreamBench's prompts_and_classes.txt: its 25 prompts for the run's subject "
            "(implies --protocol).",
        ),
    ] = None,
    n: Annotated[int, typer.Option("-n", help="Images per prompt (image j uses seed+j).")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of each prompt's first image.")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 30,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance",
            help="Classifier-free guidance. Default: the model's (7.5 SD-1/2, 5 SDXL, 5 toy).",
        ),
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option("--negative-prompt", help="Negative prompt for every image.")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option("--scheduler", help="ddim, dpm++ or euler. Default: the model's own."),
    ] = None,
    height: Annotated[
        int | None, typer.Option("--height", help="Pixels; default the model's.")
    ] = None,
    width: Annotated[
        int | None, typer.Option("--width", help="Pixels; default the model's.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Output folder. Default: <run>/samples/<time> or samples/<time>."
        ),
    ] = None,
    model: ModelOpt = None,
    unmerged: Annotated[
        bool, typer.Option("--unmerged", help="Keep the atom/LoRA layers live (not merged).")
    ] = False,
    base: Annotated[
        bool,
        typer.Option(
            "--base", help="Sample the run's base model without its adapter (same seeds)."
        ),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Images per forward pass (>1: faster, rounding-level differences)."
        ),
    ] = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    model_config: Annotated[
        str | None,
        typer.Option("--model-config", help="For a single-file --model: its diffusers configs."),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option("--vae", help="A VAE instead of the model's (default: the run's own)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Apply atoms even if they were trained on other base weights."
        ),
    ] = False,
) -> None:
    """Generate images from a run's adapted model (or a plain --model), with fixed seeds."""
    from sdatom.sample import SampleOptions, run_sampling

    options = SampleOptions(
        n=n,
        seed=seed,
        steps=steps,
        guidance=guidance,
        negative_prompt=negative_prompt,
        scheduler=scheduler,
        height=height,
        width=width,
        batch_size=batch_size,
    )
    result = run_sampling(
        run=run,
        model=model,
        prompts=prompt or (),
        prompts_file=prompts_file,
        protocol=dreambench or protocol,
        options=options,
        output=output,
        merge=not unmerged,
        base=base,
        device=device,
        dtype=dtype,
        model_config=model_config,
        vae=vae,
        force=force,
        progress=not quiet,
    )
    typer.echo(
        f"{len(result.images)} images in {result.output_dir} ({result.device}, {result.dtype})"
        f"\ngrid: {result.grid}"
    )


@command
def export(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run folder written by `sdatom train`.")],
    merged: Annotated[
        Path | None,
        typer.Option("--merged", help="Write a diffusers pipeline folder, adapter folded in."),
    ] = None,
    single_file: Annotated[
        Path | None,
        typer.Option(
            "--single-file",
            help="Write one .safetensors checkpoint in the original SD layout (A1111/ComfyUI).",
        ),
    ] = None,
    lora: Annotated[
        Path | None,
        typer.Option(
            "--lora",
            help="Write a small kohya/LoCon LoRA file (ComfyUI, A1111/Forge, diffusers): each "
            "layer's update by truncated SVD.",
        ),
    ] = None,
    diff: Annotated[
        Path | None,
        typer.Option(
            "--diff",
            help="Write the exact update as a LyCORIS full-diff file (ComfyUI, A1111/Forge).",
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="--lora: one rank for every layer.")
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option(
            "--max-error",
            help="--lora: per-layer relative Frobenius error to meet (default 0.01).",
        ),
    ] = None,
    dense: Annotated[
        str,
        typer.Option(
            "--dense",
            help="--lora, a layer whose pair would be no smaller than the layer: diff (store it "
            "exactly; diffusers cannot read those keys), error (refuse) or lora (keep the pair).",
        ),
    ] = "diff",
    samples: Annotated[
        int,
        typer.Option(
            "--samples", help="--lora/--diff: fixed-seed images compared with the exact adapter."
        ),
    ] = 2,
    sample_steps: Annotated[
        int, typer.Option("--sample-steps", help="Denoising steps of those images.")
    ] = 20,
    push_to_hub: Annotated[
        str | None,
        typer.Option("--push-to-hub", help="Upload the export and its model card to this repo."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", help="Saved weights: fp32, fp16 or bf16 (default fp32; --lora/--diff fp16)."
        ),
    ] = None,
    model: ModelOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a run: merged into the model, or as a small LoRA / LyCORIS file for other tools."""
    from sdatom.export import export as run_export

    run_export(
        run, merged=merged, single_file=single_file, lora=lora, diff=diff, rank=rank,
        max_error=max_error, dense=dense, samples=samples, sample_steps=sample_steps,
        push_to_hub=push_to_hub, dtype=dtype, model=model, progress=not quiet, echo=typer.echo,
    )  # fmt: skip


@command
def eval_(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run folder written by `sdatom train`.")],
    images: Annotated[
        Path | None,
        typer.Option(
            "--images", help="Sampled images to score. Default: the run's newest samples."
        ),
    ] = None,
    subject: Annotated[
        Path | None, typer.Option("--subject", help="Subject photos. Default: the run's subject.")
    ] = None,
    base_images: Annotated[
        Path | None,
        typer.Option("--base-images", help="Base-model images with the same prompts and seeds."),
    ] = None,
    clip_model: Annotated[str, typer.Option("--clip-model", help="open_clip architecture.")] = (
        "ViT-B-32"
    ),
    clip_weights: Annotated[
        str | None, typer.Option("--clip-weights", help="Local open_clip checkpoint file.")
    ] = None,
    dino_weights: Annotated[
        str | None, typer.Option("--dino-weights", help="Local DINO ViT-S/16 folder or file.")
    ] = None,
    random_backbones: Annotated[
        bool,
        typer.Option(
            "--random-backbones", help="Random-weight backbones: smoke tests only, not quality."
        ),
    ] = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Score a run's samples: CLIP-T, CLIP-I, DINO, diversity; writes eval/report.html."""
    from sdatom.eval.metrics import format_table
    from sdatom.eval.run import evaluate_run
    from sdatom.models import resolve_device

    metrics = evaluate_run(
        run,
        images=images,
        subject=subject,
        base_images=base_images,
        clip_model=clip_model,
        clip_weights=clip_weights,
        dino_weights=dino_weights,
        random_backbones=random_backbones,
        device=str(resolve_device(device)),
        progress=not quiet,
    )
    typer.echo(format_table(metrics))
    typer.echo(f"report: {run / 'eval' / 'report.html'}")


@command
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to compare (each evaluated).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for compare.md/.html and the plot.")
    ] = Path("runs/compare"),
) -> None:
    """One table and one plot across runs: method, size, train time and every metric."""
    from sdatom.eval.compare import compare as compare_runs

    result = compare_runs(runs, output)
    typer.echo(result["markdown"])
    typer.echo(f"page: {output / 'compare.html'}")
