"""pyproject.toml's dependency floors are at least what the code needs, and met here.

The code's needs, each with the API that sets it (checked in that release's sources):
torch 2.4 (torch.get_autocast_dtype), diffusers 0.40 (from_pretrained/from_single_file accept
``dtype=``), transformers 5.0 (CLIPTokenizer built from an in-memory vocab and merges). That
the floors also resolve together is .ci/check_floors.py's job (it needs PyPI).
"""

import re
from importlib.metadata import version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

NEEDS = {"torch": (2, 4), "diffusers": (0, 40), "transformers": (5, 0), "safetensors": (0, 8)}


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def _floors() -> dict[str, tuple[int, ...]]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)(,.*)?", dep)
        assert m, f"{dep!r} has no '>=' floor"
        out[m.group(1).lower()] = _release(m.group(2))
    return out


def test_floors_cover_the_api_the_code_uses():
    floors = _floors()
    for name, need in NEEDS.items():
        assert floors[name] >= need, (name, floors[name], need)


def test_installed_versions_meet_the_floors():
    for name, floor in _floors().items():
        assert _release(version(name)) >= floor, (name, version(name), floor)


def test_the_code_uses_what_sets_the_floors():
    """If these uses go away, the floors may come down (and this test says so)."""
    root = Path(__file__).resolve().parents[1] / "sdatom"
    source = "\n".join(p.read_text() for p in root.rglob("*.py"))
    assert "torch.get_autocast_dtype" in source
    assert "dtype=torch_dtype" in source  # diffusers loaders
    assert "CLIPTokenizer(" in source
