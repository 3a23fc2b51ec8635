"""``python -m sdatom`` (and ``accelerate launch -m sdatom``) runs the CLI."""

from sdatom.cli import app

if __name__ == "__main__":
    app()
