"""report.html from a metrics dict: self-contained, escaped, banner only for random backbones."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from sdatom.eval.common import METRICS, RANDOM_WARNING
from sdatom.eval.report import write_report


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _sources(page: Path) -> list[str]:
    parser = _Images()
    parser.feed(page.read_text())
    return parser.sources


def _metrics(tmp_path: Path, *, random: bool, prompt: str = "a sks dog", base: bool = False):
    samples, subject = tmp_path / "samples", tmp_path / "subject"
    samples.mkdir()
    subject.mkdir()
    Image.new("RGB", (64, 64), (0, 128, 255)).save(samples / "p000-i00.png")
    Image.new("RGB", (64, 64), (0, 200, 0)).save(subject / "00.jpg")
    image = {"file": "p000-i00.png", "prompt": prompt, "seed": 0, "clip_t": 0.31,
             "clip_i": 0.8, "dino": 0.6}  # fmt: skip
    if base:
        (tmp_path / "base").mkdir()
        Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "base" / "b.png")
        image |= {"base_file": str(tmp_path / "base" / "b.png"), "preserve_clip_i": 0.9}
    overall = {key: 0.5 for key, _, _ in METRICS}
    return {
        "format": "sdatom-eval/1",
        "random_backbones": random,
        "backbones": {"clip": "ViT-B-32 (openai)", "dino": "facebook/dino-vits16", "lpips": None},
        "run": {"name": "dog-atoms", "method": "atoms", "model": "sd15"},
        "settings": {},
        "inputs": {
            "images_dir": str(samples),
            "subject_images": [str(subject / "00.jpg")],
            "base_images_dir": str(tmp_path / "base") if base else None,
            "token": "sks",
            "n_images": 1,
            "n_prompts": 1,
            "n_subject_images": 1,
        },  # fmt: skip
        "overall": overall,
        "notes": {"lpips_diversity": "no <weights> here"},
        "prompts": [
            {
                "prompt": prompt,
                "text": prompt.replace("sks ", ""),
                "n_images": 1,
                "files": ["p000-i00.png"],
                "clip_t": 0.31,
                "clip_i": 0.8,
                "dino": 0.6,
            }
        ],  # fmt: skip
        "images": [image],
    }


def test_report_is_self_contained_in_its_folder(tmp_path):
    out = tmp_path / "run" / "eval"
    write_report(_metrics(tmp_path, random=False), out)
    # Originals gone and the folder moved: the page still finds every image it shows.
    shutil.rmtree(tmp_path / "samples")
    shutil.rmtree(tmp_path / "subject")
    moved = shutil.move(str(out), str(tmp_path / "elsewhere"))
    sources = _sources(Path(moved) / "report.html")
    assert len(sources) == 3  # plot, subject photo, sample
    for src in sources:
        assert not src.startswith(("/", "file:")) and (Path(moved) / src).is_file(), src


def test_banner_only_with_random_backbones(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    page = write_report(_metrics(tmp_path / "a", random=True), tmp_path / "a" / "eval")
    assert RANDOM_WARNING in page.read_text() and 'class="banner"' in page.read_text()
    page = write_report(_metrics(tmp_path / "b", random=False), tmp_path / "b" / "eval")
    assert RANDOM_WARNING not in page.read_text()
    assert "dog-atoms" in page.read_text() and "atoms" in page.read_text()


def test_prompts_and_notes_are_escaped(tmp_path):
    metrics = _metrics(tmp_path, random=False, prompt="a sks <b>dog</b> & cat")
    text = write_report(metrics, tmp_path / "eval").read_text()
    assert "<b>dog</b>" not in text and "&lt;b&gt;dog&lt;/b&gt; &amp; cat" in text
    assert "no &lt;weights&gt; here" in text


def test_base_images_are_shown_and_stale_thumbnails_removed(tmp_path):
    out = tmp_path / "eval"
    (out / "thumbs").mkdir(parents=True)
    (out / "thumbs" / "old.jpg").write_bytes(b"stale")
    write_report(_metrics(tmp_path, random=False, base=True), out)
    assert not (out / "thumbs" / "old.jpg").exists()
    sources = _sources(out / "report.html")
    assert "thumbs/p000-00-base.jpg" in sources and len(sources) == 4
    assert "Preserve CLIP-I" in (out / "report.html").read_text()
