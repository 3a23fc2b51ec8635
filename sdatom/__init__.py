"""sdatom: personalize Stable Diffusion by tuning filter atoms."""

__version__ = "0.1.0"
