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
import warnings
from typing import Annotated

import typer

from sdatom import __version__
from sdatom.errors import SdatomError

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
        help="Base model: a hub id, a local diffusers folder, a .safetensors/.ckpt file, 'tiny' "
        "or 'random:sd15'/'random:sd21'. Default: $SDATOM_MODEL or SD-1.5.",
        show_default=False,
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", help="Atom preset: atoms, atoms-oc, atoms-attn, or a YAML atom config file."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def command(fn):
    """Register ``fn`` as a command whose SdatomErrors become one red line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdatomError as e:
            if os.environ.get("SDATOM_DEBUG"):
                raise
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(e.exit_code)

    return app.command()(wrapper)


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
