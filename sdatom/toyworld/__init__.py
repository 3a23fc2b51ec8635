"""The toy world: pictures with exact ground truth, its oracle, subjects and the ``toy`` model."""

from sdatom.toyworld.oracle import Reading, read
from sdatom.toyworld.world import ToyObject, caption, draw, is_held_out, sample_object

__all__ = ["Reading", "ToyObject", "caption", "draw", "is_held_out", "read", "sample_object"]
