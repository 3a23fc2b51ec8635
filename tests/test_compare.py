"""compare(): one table (markdown + HTML) and a plot over evaluated runs."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from sdatom.errors import UsageError
from sdatom.eval.compare import compare, human_bytes


def _run(root: Path, name: str, method: str, params: int, metrics: dict | None, random=False):
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "method": method, "preset": "small" if method == "atoms" else None, "model": "sd15",
        "trainable_params": params, "adapter_bytes": params * 4, "train_seconds": 754.2,
        "steps": 400, "token": "sks", "class_name": "dog", "subject": "data/dog",
    }  # fmt: skip
    (run / "train_summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(
            json.dumps(
                {
                    "random_backbones": random,
                    "backbones": {"clip": f"ViT-B-32 ({'random' if random else 'openai'})"},
                    "inputs": {"n_images": 8},
                    "overall": metrics,
                }
            )
        )
    return run


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_compare_two_runs_writes_table_page_and_plot(tmp_path):
    atoms = _run(
        tmp_path,
        "dog-atoms",
        "atoms",
        4626,
        {"clip_t": 0.313, "clip_i": 0.715, "dino": 0.572, "lpips_diversity": None},
    )
    lora = _run(
        tmp_path,
        "dog-lora",
        "lora",
        797184,
        {"clip_t": 0.239, "clip_i": 0.792, "dino": 0.637, "lpips_diversity": None},
    )
    out = tmp_path / "cmp"
    result = compare([atoms, lora], out)

    md = (out / "compare.md").read_text()
    assert md == result["markdown"]
    header, rule, row_atoms, row_lora = md.splitlines()[:4]
    assert header.startswith("| run | method | preset | trainable params | adapter size")
    assert "CLIP-T" in header and "DINO" in header and "DIV (LPIPS)" not in header
    assert "| dog-atoms | atoms | small | 4,626 | 18.1 KiB | 12m 34s | 400 | 0.3130 |" in row_atoms
    assert "797,184" in row_lora and "0.7920" in row_lora
    assert not result["notes"]

    page = (out / "compare.html").read_text()
    assert "dog-atoms" in page and "dog-lora" in page and "RANDOM BACKBONES" not in page
    parser = _Images()
    parser.feed(page)
    assert parser.sources == ["compare.png"]
    with Image.open(out / "compare.png") as plot:
        assert plot.width > 500 and plot.height > 200


def test_run_without_eval_is_a_usage_error_naming_it(tmp_path):
    done = _run(tmp_path, "dog-atoms", "atoms", 4626, {"clip_t": 0.3})
    todo = _run(tmp_path, "dog-lora", "lora", 797184, None)
    with pytest.raises(UsageError, match=r"dog-lora has no eval/metrics.json: run `sdatom eval"):
        compare([done, todo], tmp_path / "cmp")
    with pytest.raises(UsageError, match="does not exist"):
        compare([tmp_path / "nope"], tmp_path / "cmp")
    with pytest.raises(UsageError, match="no runs"):
        compare([], tmp_path / "cmp")


def test_random_backbones_and_mismatches_are_flagged(tmp_path):
    a = _run(tmp_path, "a", "atoms", 10, {"clip_t": 0.1, "clip_i": 0.2}, random=True)
    b = _run(tmp_path, "b", "full", 10**9, {"clip_t": 0.2, "clip_i": 0.3})
    result = compare([a, b], tmp_path / "cmp")
    assert "RANDOM BACKBONES" in result["markdown"]
    assert 'class="banner"' in (tmp_path / "cmp" / "compare.html").read_text()
    assert any("different backbones" in note for note in result["notes"])


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_bytes(None) == "—"
