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
