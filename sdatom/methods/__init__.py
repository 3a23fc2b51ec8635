"""The training methods, one file each, and their registry.

A new method is one file here (a :class:`Method` subclass) and one line in ``_REGISTRY``.
"""

from __future__ import annotations

from sdatom.methods.atoms import AtomsMethod
from sdatom.methods.base import ADAPTER_FILE, Method
from sdatom.methods.full import FullMethod
from sdatom.methods.lora import LoraMethod

__all__ = ["ADAPTER_FILE", "METHODS", "Method", "get_method"]

_REGISTRY: dict[str, Method] = {m.name: m for m in (AtomsMethod(), LoraMethod(), FullMethod())}
METHODS = tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name`` (KeyError for an unknown one: configs validate names first)."""
    return _REGISTRY[name]
