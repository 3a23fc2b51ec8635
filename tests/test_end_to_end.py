"""The whole job through the CLI on the tiny model: train -> sample -> eval -> compare."""

import json
import os

import pytest
from typer.testing import CliRunner

from sdatom.cli import app

SUBJECT = os.path.join(os.path.dirname(__file__), "..", "data", "toy")
runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_atoms_and_lora_runs_train_sample_eval_and_compare(tmp_path):
    runs = []
    for method in ("atoms", "lora"):
        run = tmp_path / method
        _ok(
            [
                "train",
                "--subject",
                SUBJECT,
                "--class-name",
                "toy",
                "--model",
                "tiny",
                "--method",
                method,
                "--steps",
                "3",
                "--resolution",
                "32",
                "--no-prior",
                "--report-to",
                "none",
                "--output",
                str(run),
            ]
        )
        prompts = ["--prompt", "a photo of sks toy on a beach", "--prompt", "a sks toy in snow"]
        _ok(
            [
                "sample",
                "--run",
                str(run),
                *prompts,
                "-n",
                "2",
                "--steps",
                "2",
                "--output",
                str(run / "samples" / "eval"),
                "--device",
                "cpu",
            ]
        )
        out = _ok(["eval", "--run", str(run), "--random-backbones", "--device", "cpu"])
        assert "RANDOM BACKBONES" in out and "CLIP-T" in out
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert metrics["random_backbones"] is True and metrics["inputs"]["n_images"] == 4
        assert (run / "eval" / "report.html").is_file()
        runs.append(str(run))
    out = _ok(["compare", *runs, "--output", str(tmp_path / "cmp")])
    assert "atoms" in out and "lora" in out
    for name in ("compare.md", "compare.html", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
