"""The CLI shell: help texts, inspect, and the one-line error path."""

import json

import pytest
from typer.testing import CliRunner

from sdatom.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "inspect" in result.output


@pytest.mark.parametrize(
    "command", [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_inspect_sd15_json():
    result = runner.invoke(app, ["inspect", "--model", "random:sd15", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["unet_params"] == 859_520_964
    groups = {g["group"]: g for g in report["groups"]}
    assert groups["Conv2d 3x3"]["layers"] == 52
    assert groups["Conv2d 1x1"]["layers"] == 46


def test_inspect_table_on_tiny_folder(tiny_dir):
    result = runner.invoke(app, ["inspect", "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    assert "Conv2d 3x3" in result.output and "UNet total" in result.output


def test_bad_model_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["inspect", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a diffusers pipeline folder" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("preset", "trainable"), [("atoms", 4258), ("atoms-attn", 37026)])
def test_inspect_preset_trainable_counts_on_sd15(preset, trainable):
    result = runner.invoke(app, ["inspect", "--model", "random:sd15", "--preset", preset, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["trainable_params"] == trainable
    assert sum(g["trainable"] for g in report["trainable_groups"]) == trainable
    assert report["adapter_bytes"]["fp32"] == 2 * report["adapter_bytes"]["fp16"] > 4 * trainable


def test_train_cli_passes_options_to_the_library(monkeypatch, tmp_path):
    import sdatom.train

    seen = {}

    def fake_train(config, *, resume=None, overwrite=False):
        seen.update(config=config, resume=resume, overwrite=overwrite)
        return sdatom.train.TrainResult(tmp_path, tmp_path / "adapter.safetensors", 3, 1.0, 9, 0.1)

    monkeypatch.setattr(sdatom.train, "train", fake_train)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("steps: 50\nlr: 0.002\n")
    args = [
        "train",
        "--subject",
        "dog",
        "--class-name",
        "dog",
        "--config",
        str(config_file),
        "--steps",
        "3",
        "--no-prior",
        "--method",
        "lora",
        "--validation-prompt",
        "a sks dog",
        "--train-token",
        "--token-lr",
        "0.003",
        "--token-vectors",
        "4",
        "--resume",
        "latest",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    c = seen["config"]
    assert (c.steps, c.lr, c.prior, c.method, c.subject) == (3, 0.002, False, "lora", "dog")
    assert (c.train_token, c.token_lr, c.token_vectors) == (True, 0.003, 4)
    assert c.validation_prompts == ("a sks dog",) and seen["resume"] == "latest"
