"""The toy world: its pictures, captions, held-out rules, oracle, subjects and toy prompts."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdatom.toyworld import oracle, quality, subjects, world

ROOT = Path(__file__).resolve().parent.parent


def test_world_batches_are_a_pure_function_of_the_seed():
    a_images, a_captions, a_objs = world.world_batch(11, 8)
    b_images, b_captions, b_objs = world.world_batch(11, 8)
    c_images, _, _ = world.world_batch(12, 8)
    assert a_captions == b_captions and a_objs == b_objs
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(a_images, b_images, strict=False)
    )
    assert not all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(a_images, c_images, strict=False)
    )


def test_pictures_follow_the_contract():
    rng = random.Random(0)
    for _ in range(50):
        obj = world.sample_object(rng, allow_held_out=True)
        px = np.asarray(world.draw(obj))
        assert px.shape == (32, 32, 3)
        # The border is the flat background, exactly.
        assert (px[0] == world.PALETTE[obj.background]).all()
        assert obj.background not in obj.colors
        assert world.RADIUS[0] <= obj.radius <= world.RADIUS[1]
        assert abs(obj.cx - world.POSITIONS[obj.position]) <= 1.0


def test_the_oracle_reads_1000_world_pictures_right():
    rng = random.Random(2024)
    wrong = 0
    for _ in range(1000):
        obj = world.sample_object(rng, allow_held_out=True)
        wrong += not all(oracle.read(world.draw(obj)).matches(obj).values())
    assert wrong <= 10  # >= 99 % (it reads all of them in practice)


def test_the_oracle_reads_blurred_pictures_too():
    # Generated pictures are softer than drawn ones: a mild blur must not change the reading.
    rng = random.Random(5)
    right = 0
    for _ in range(200):
        obj = world.sample_object(rng, texture="solid")
        img = world.draw(obj).filter(ImageFilter.GaussianBlur(0.6))
        right += all(oracle.read(img).matches(obj).values())
    assert right >= 190


def test_an_empty_picture_has_no_object():
    img = Image.new("RGB", (32, 32), world.PALETTE["blue"])
    reading = oracle.read(img)
    assert reading.background == "blue" and reading.shape is None and reading.colors is None


def test_pretraining_never_draws_held_out_objects():
    rng = random.Random(1)
    for _ in range(3000):
        obj = world.sample_object(rng)
        assert not world.is_held_out(obj)
        assert set(obj.colors) != world.RESERVED_PAIR
        if obj.texture == "solid":
            assert (obj.colors[0], obj.shape) not in world.HELD_OUT_SOLID


def test_world_batch_two_tone_share_is_the_one_asked_and_stays_held_in():
    # pretrain_toy's unet-zsnr stage asks for more two-tone objects than the default 0.4.
    _, _, objs = world.world_batch(5, 400, two_tone=0.8)
    share = np.mean([o.texture != "solid" for o in objs])
    assert 0.74 <= share <= 0.86  # 400 draws at 0.8: 3 standard deviations is 0.06
    assert not any(world.is_held_out(o) for o in objs)
    _, _, default = world.world_batch(5, 400)
    assert 0.33 <= np.mean([o.texture != "solid" for o in default]) <= 0.47


def test_captions_parse_back_to_what_was_drawn():
    rng = random.Random(3)
    for _ in range(300):
        obj = world.sample_object(rng)
        text = world.random_caption(obj, rng)
        asked = world.parse_prompt(text)
        assert asked is not None, text
        assert asked.shape == obj.shape and asked.token is None
        assert asked.appearance in (None, obj.appearance)
        assert asked.position in (None, obj.position)
        assert asked.background in (None, obj.background)
    sks = world.parse_prompt("a photo of sks square on the left on a blue background")
    assert (sks.token, sks.shape, sks.position, sks.background) == ("sks", "square", "left", "blue")
    assert world.parse_prompt("a photo of a dog") is None


def test_every_subject_is_held_out_and_its_folder_matches(tmp_path):
    assert len(subjects.SUBJECTS) >= 8
    names = [s.name for s in subjects.SUBJECTS]
    assert len(set(names)) == len(names)
    for s in subjects.SUBJECTS:
        objs = s.objects()
        assert len(objs) == subjects.INSTANCE_IMAGES
        assert len({o.background for o in objs}) == subjects.INSTANCE_BACKGROUNDS
        assert all(world.is_held_out(o) for o in objs)
        shipped = sorted((ROOT / "data" / "toyworld" / s.name).glob("*.png"))
        drawn = sorted(subjects.write_subject(s, tmp_path / s.name).glob("*.png"))
        assert [p.name for p in shipped] == [p.name for p in drawn]
        for a, b in zip(shipped, drawn, strict=False):
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert subjects.read_subject(shipped) == s


def test_protocol_puts_the_subject_on_unseen_backgrounds_at_every_position():
    s = subjects.SUBJECTS[0]
    prompts = subjects.protocol(s)
    subject_prompts = [world.parse_prompt(p) for p, role in prompts if role == "subject"]
    assert {p.background for p in subject_prompts}.isdisjoint(s.backgrounds)
    assert {p.position for p in subject_prompts} == set(world.POSITIONS)
    assert all(p.token == "sks" and p.shape == s.shape for p in subject_prompts)
    class_prompts = [world.parse_prompt(p) for p, role in prompts if role == "class"]
    assert class_prompts and all(p.token is None and p.appearance is None for p in class_prompts)


def test_oracle_metrics_score_drawn_pictures_exactly():
    s = subjects.SUBJECTS[1]
    rng = random.Random(0)
    prompts, images = [], []
    for text, role in subjects.protocol(s):
        asked = world.parse_prompt(text)
        if role == "subject":  # a perfect model: the subject where it was asked for
            obj = world.sample_object(
                rng,
                shape=s.shape,
                colors=s.colors,
                texture=s.texture,
                background=asked.background,
                position=asked.position,
                allow_held_out=True,
            )
        else:  # the class word drawn as an ordinary square: no drift
            obj = world.sample_object(
                rng, shape=s.shape, texture="solid", background=asked.background
            )
        prompts.append(text)
        images.append(world.draw(obj))
    overall, rows = quality.oracle_metrics(s, prompts, images, "sks")
    assert overall["oracle_fidelity"] == 1.0 and overall["oracle_alignment"] == 1.0
    assert overall["oracle_alignment_background"] == overall["oracle_alignment_position"] == 1.0
    assert overall["oracle_drift"] == 0.0
    # Swap the class images for the subject: drift becomes 1.
    drifted = [
        im if r["role"] == "subject" else images[0] for im, r in zip(images, rows, strict=False)
    ]
    assert quality.oracle_metrics(s, prompts, drifted, "sks")[0]["oracle_drift"] == 1.0
    # Wrong backgrounds: alignment falls, fidelity stays.
    shifted = images[1:] + images[:1]
    misaligned = quality.oracle_metrics(s, prompts[:-1], shifted[:-1], "sks")[0]
    assert misaligned["oracle_alignment"] < 1.0


def test_gini_simpson_diversity():
    assert quality.gini_simpson(["a"] * 5) == 0.0
    assert quality.gini_simpson(["a", "b"]) == pytest.approx(0.5)


def _probe_toy():
    """scripts/probe_toy.py as a module."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "probe_toy.py"
    spec = importlib.util.spec_from_file_location("probe_toy", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def test_probe_captions_name_each_instance_pictures_place(tmp_path):
    from sdatom.data import caption_for

    probe = _probe_toy()
    s = subjects.subject("pink-cyan-striped-square")
    folder = probe.subject_folder(tmp_path / "full", s, "full")
    pictures = sorted(folder.glob("*.png"))
    assert len(pictures) == subjects.INSTANCE_IMAGES
    for picture in pictures:
        asked = world.parse_prompt(caption_for(picture, "a photo of sks square"))
        seen = oracle.read(Image.open(picture))
        assert (asked.token, asked.shape) == ("sks", "square")
        assert (asked.background, asked.position) == (seen.background, seen.position)
    plain = probe.subject_folder(tmp_path / "plain", s, "default")
    assert not list(plain.glob("*.txt"))


def test_probe_curve_summary_means_steps_and_picks_one_checkpoint_per_subject():
    probe = _probe_toy()

    def record(subject, step, fidelity, clip_i):
        scores = {"oracle_alignment_position": 1.0, "oracle_world": 0.9, "clip_i": clip_i}
        return {"subject": subject, "step": step, "oracle_fidelity": fidelity, **scores}

    records = [
        record("a", 150, 0.2, 0.5),
        record("a", 300, 0.8, 0.4),
        record("b", 150, 0.6, 0.7),
        record("b", 300, 0.4, 0.6),
        record("b", 450, 1.0, 0.9),  # b alone reached 450: not a common step
    ]
    summary = probe.curve_summary(records)
    assert summary["steps"] == [150, 300]
    assert summary["per_step"][150]["oracle_fidelity"] == pytest.approx(0.4)
    assert summary["per_step"][300]["oracle_fidelity"] == pytest.approx(0.6)
    assert summary["picked"]["oracle"] == pytest.approx((0.8 + 0.6) / 2)
    assert summary["picked"]["clip_i"] == pytest.approx((0.2 + 0.6) / 2)
