"""Evaluation prompts: sdatom's own set, DreamBench's file, live classes and strip_token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdatom.errors import DataError
from sdatom.prompts import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    is_live_class,
    load_dreambench_prompts,
    protocol_prompts,
    strip_token,
)


def _dreambench_file() -> Path:
    root = os.environ.get("SDATOM_SHARED")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared"
    path = base / "dreambench" / "prompts_and_classes.txt"
    if not path.is_file():
        pytest.skip(f"DreamBench prompts are not available at {path} (set SDATOM_SHARED)")
    return path


MINI = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in a field'.format(unique_token, class_token),
'a green {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in a hat'.format(unique_token, class_token),
]
"""


@pytest.mark.parametrize("prompts", [OBJECT_PROMPTS, LIVE_PROMPTS])
def test_own_prompt_lists_are_well_formed(prompts):
    assert 20 <= len(prompts) <= 25
    assert len(set(prompts)) == len(prompts)
    for p in prompts:
        assert p.count("{}") == 1 and "{0}" not in p, p


def test_own_prompts_are_not_dreambench_prompts():
    path = _dreambench_file()
    objects, lives, _ = load_dreambench_prompts(path)
    assert not set(OBJECT_PROMPTS) & set(objects)
    assert not set(LIVE_PROMPTS) & set(lives)


def test_protocol_prompts_fill_the_subject():
    prompts = protocol_prompts("sks  dog", live=True)
    assert len(prompts) == len(LIVE_PROMPTS)
    assert all("sks dog" in p and "{}" not in p for p in prompts)
    assert protocol_prompts("sks mug", live=False)[0] == OBJECT_PROMPTS[0].replace("{}", "sks mug")
    with pytest.raises(DataError, match="subject text is empty"):
        protocol_prompts("  ", live=False)


def test_parse_mini_dreambench_file(tmp_path):
    path = tmp_path / "prompts_and_classes.txt"
    path.write_text(MINI)
    objects, lives, classes = load_dreambench_prompts(path)
    assert objects == ["a {} in a field", "a green {}"]
    assert lives == ["a {} in a hat"]
    assert classes == {"backpack": "backpack", "dog": "dog"}
    assert protocol_prompts("sks dog", live=True, source=path) == ["a sks dog in a hat"]


def test_parse_real_dreambench_file():
    objects, lives, classes = load_dreambench_prompts(_dreambench_file())
    assert len(objects) == 25 and len(lives) == 25
    assert len(classes) == 30
    assert classes["dog"] == "dog" and classes["bear_plushie"] == "stuffed animal"
    assert objects[0] == "a {} in the jungle"
    live_subjects = [s for s, c in classes.items() if is_live_class(c)]
    assert len(live_subjects) == 9  # DreamBench: 21 objects, 9 live subjects
    assert len(protocol_prompts("sks dog", live=True, source=_dreambench_file())) == 25


def test_missing_dreambench_file(tmp_path):
    with pytest.raises(DataError, match="nothere.txt does not exist"):
        load_dreambench_prompts(tmp_path / "nothere.txt")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("hello world\n", "unexpected line 'hello world'"),
        ("Classes\nsubject_name,class\nnocomma\n", "nocomma"),
        (MINI.replace("'a green {0} {1}'", "'a green {1} {0}'"), "exactly once"),
        (MINI.replace(".format(unique_token, class_token)", "", 1), "not a DreamBench prompt"),
        (MINI.split("Live Subject Prompts")[0], "Live Subject Prompts"),
    ],
)
def test_malformed_dreambench_file(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        load_dreambench_prompts(path)
    assert "bad.txt" in str(err.value)


@pytest.mark.parametrize(
    ("name", "live"),
    [("dog", True), ("cat", True), ("Cats", True), ("tabby cat", True), ("puppy", True),
     ("stuffed animal", False), ("toy", False), ("backpack", False), ("", False),
     ("hot dog bun", False), ("catalogue", False)],
)  # fmt: skip
def test_is_live_class(name, live):
    assert is_live_class(name) is live


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a sks dog in the snow", "a dog in the snow"),
        ("sks dog", "dog"),
        ("a photo of  sks   dog , wet", "a photo of dog, wet"),
        ("a sks, shiny", "a, shiny"),
        ("a sksy dog", "a sksy dog"),  # whole words only
        ("a <sks> dog", "a dog"),
    ],
)
def test_strip_token(prompt, expected):
    token = "<sks>" if "<sks>" in prompt else "sks"
    assert strip_token(prompt, token) == expected


def test_strip_token_needs_a_token():
    with pytest.raises(ValueError):
        strip_token("a dog", " ")
