"""Evaluation prompts: sdatom's own protocol set, DreamBench's file, and token helpers.

Prompt templates hold one ``{}`` where the subject text goes (for example ``"sks dog"``).
sdatom's own lists below are written for this project; DreamBench's prompts are only read from
its ``prompts_and_classes.txt`` when the user points at it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdatom.errors import DataError

__all__ = [
    "LIVE_CLASSES",
    "LIVE_PROMPTS",
    "OBJECT_PROMPTS",
    "is_live_class",
    "load_dreambench_prompts",
    "protocol_prompts",
    "strip_token",
]

#: sdatom's prompts for objects: scenes, accessories, recolouring, materials, art styles.
OBJECT_PROMPTS: tuple[str, ...] = (
    "a {} on a wooden kitchen table next to a cup of coffee",
    "a {} on a snowy mountain ridge at sunrise",
    "a {} lying in the sand on a tropical beach",
    "a {} on a shelf in a cozy library",
    "a {} on a rainy city sidewalk at night with neon lights",
    "a {} floating in outer space with the earth behind it",
    "a {} in a field of lavender flowers",
    "a {} on a desk beside a laptop and a potted plant",
    "a {} under water surrounded by colourful fish",
    "a {} on a picnic blanket in a park",
    "a {} in a shop window display",
    "a {} with a small paper crown on top",
    "a {} wrapped with a red ribbon like a present",
    "a green {}",
    "a blue {} with white polka dots",
    "a {} made of glass",
    "a {} carved out of wood",
    "a {} made of gold",
    "a {} knitted from wool",
    "a watercolor painting of a {}",
    "a pencil sketch of a {}",
    "a {} in the style of a pixel art video game",
    "an oil painting of a {} in the style of van Gogh",
    "a {} as a 3d cartoon render",
)

#: sdatom's prompts for live subjects (pets, people): scenes, outfits, recolouring, styles.
LIVE_PROMPTS: tuple[str, ...] = (
    "a {} sitting on a sofa in a living room",
    "a {} running across a snowy field",
    "a {} on a sandy beach at sunset",
    "a {} in a garden full of tulips",
    "a {} on a boat on a calm lake",
    "a {} in front of a castle",
    "a {} in a busy city street",
    "a {} sleeping on a rug by a fireplace",
    "a {} in an autumn forest",
    "a {} wearing sunglasses",
    "a {} wearing a knitted blue sweater",
    "a {} wearing a crown",
    "a {} wearing a bow tie",
    "a {} dressed as an astronaut",
    "a {} in a raincoat holding an umbrella",
    "a {} with a flower necklace",
    "a pink {}",
    "a {} made of plush fabric",
    "a bronze statue of a {}",
    "a watercolor painting of a {}",
    "a charcoal drawing of a {}",
    "a {} in the style of a comic book",
    "a mosaic of a {}",
    "a {} as a 3d cartoon character",
)

#: Classes treated as live subjects. DreamBench's live subjects are dogs and cats; common
#: pets and people are added. "animal" is left out on purpose: "stuffed animal" is an object.
LIVE_CLASSES = frozenset(
    {
        "dog", "puppy", "cat", "kitten", "bird", "parrot", "horse", "pony", "rabbit", "bunny",
        "hamster", "guinea pig", "ferret", "person", "man", "woman", "boy", "girl", "child",
        "baby", "kid",
    }
)  # fmt: skip

_DB_ITEM = re.compile(
    r"""^\s*(['"])(?P<text>.*)\1\.format\(\s*unique_token\s*,\s*class_token\s*\)"""
)


def is_live_class(class_name: str) -> bool:
    """Whether ``class_name`` is a live subject (``"dog"``, ``"tabby cat"``, ``"Cats"``)."""
    words = class_name.lower().split()
    if not words:
        return False
    name = " ".join(words)
    if name in LIVE_CLASSES:
        return True
    for candidate in (words[-1], " ".join(words[-2:])):
        if candidate in LIVE_CLASSES or (
            candidate.endswith("s") and candidate[:-1] in LIVE_CLASSES
        ):
            return True
    return False


def load_dreambench_prompts(
    path: str | os.PathLike,
) -> tuple[list[str], list[str], dict[str, str]]:
    """Parse DreamBench's ``prompts_and_classes.txt``.

    Returns ``(object_prompts, live_prompts, classes)``: the two lists as ``{}`` templates
    (DreamBench's ``{0} {1}``, token then class, becomes one ``{}``) and ``{subject: class}``.

    Raises:
        DataError: the file is missing or not in that format.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"DreamBench prompt file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a DreamBench prompts_and_classes.txt ({err})") from None

    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        low = line.lower()
        if not line or low == "prompts" or low.startswith("prompt_list") or line == "]":
            continue
        if low == "classes":
            section = "classes"
        elif low == "object prompts":
            section = "object"
        elif low == "live subject prompts":
            section = "live"
        elif section == "classes":
            if low.replace(" ", "") == "subject_name,class":
                continue
            subject, sep, cls = line.partition(",")
            if not sep or not subject.strip() or not cls.strip():
                raise DataError(
                    f"{path}:{lineno} is not a 'subject_name,class' line: {line!r}; "
                    "is this DreamBench's prompts_and_classes.txt?"
                )
            classes[subject.strip()] = cls.strip()
        elif section in lists:
            match = _DB_ITEM.match(line)
            if match is None:
                raise DataError(
                    f"{path}:{lineno} is not a DreamBench prompt line "
                    f"(\"'a {{0}} {{1}} ...'.format(unique_token, class_token),\"): {line!r}"
                )
            template = match["text"].replace("{0} {1}", "{}")
            if template.count("{}") != 1 or "{0}" in template or "{1}" in template:
                raise DataError(
                    f"{path}:{lineno}: prompt {match['text']!r} does not hold '{{0}} {{1}}' "
                    "(token then class) exactly once"
                )
            lists[section].append(template)
        else:
            raise DataError(
                f"{path}:{lineno}: unexpected line {line!r} outside the Classes / Object Prompts"
                " / Live Subject Prompts sections; is this DreamBench's prompts_and_classes.txt?"
            )

    missing = [
        name
        for name, found in (
            ("Classes", classes),
            ("Object Prompts", lists["object"]),
            ("Live Subject Prompts", lists["live"]),
        )
        if not found
    ]
    if missing:
        raise DataError(
            f"{path} is not a DreamBench prompts_and_classes.txt: no entries in section(s) "
            + ", ".join(missing)
        )
    return lists["object"], lists["live"], classes


def protocol_prompts(
    subject_text: str, live: bool, source: str | os.PathLike | None = None
) -> list[str]:
    """The evaluation prompts with ``subject_text`` (e.g. ``"sks dog"``) filled in.

    ``source=None`` uses sdatom's own lists (:data:`OBJECT_PROMPTS` / :data:`LIVE_PROMPTS`);
    a path uses that DreamBench ``prompts_and_classes.txt``. ``live`` picks the live-subject
    list (see :func:`is_live_class`).
    """
    subject = " ".join(subject_text.split())
    if not subject:
        raise DataError("the subject text is empty: pass e.g. 'sks dog'")
    if source is None:
        templates = list(LIVE_PROMPTS if live else OBJECT_PROMPTS)
    else:
        objects, lives, _ = load_dreambench_prompts(source)
        templates = lives if live else objects
    return [t.replace("{}", subject) for t in templates]


def token_pattern(token: str) -> re.Pattern[str]:
    """``token`` as a whole word (``sks`` in ``a sks dog``, not in ``asks``)."""
    return re.compile(rf"(?<!\w){re.escape(token)}(?!\w)")


def strip_token(prompt: str, token: str) -> str:
    """Remove the placeholder ``token`` (whole words only) and normalise whitespace.

    ``strip_token("a sks dog in the snow", "sks") == "a dog in the snow"``. Used to score
    CLIP-T against the prompt a base model understands.
    """
    token = token.strip()
    if not token:
        raise ValueError("token must be a non-empty string")
    out = token_pattern(token).sub(" ", prompt)
    out = " ".join(out.split())
    return re.sub(r"\s+([,.;:!?])", r"\1", out)
