"""The resolution task's builder: canvases whose answers are what is drawn, splits apart, recipes that load."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from PIL import Image

from mllm.demo.resolution import COLORS, SHAPES, ResolutionTask, build_resolution_data, draw_canvas, main

SMALL = dict(train=6, val=3, test=4, canvas=(224, 112), shape_size=(20, 24), clutter=2)


def _shape_pixels(image: Image.Image, rgb: tuple[int, int, int]) -> list[tuple[int, int]]:
    px = image.load()
    return [(x, y) for x in range(image.width) for y in range(image.height) if px[x, y] == rgb]


def test_each_canvas_shows_its_answer_shape_in_its_answer_colour():
    task = ResolutionTask(**SMALL)
    rng = random.Random(0)
    seen = Counter()
    for _ in range(40):
        image, shape, color = draw_canvas(rng, task)
        assert image.size == (224, 112) and shape in SHAPES
        xs, ys = zip(*_shape_pixels(image, COLORS[color]), strict=True)
        w, h = max(xs) - min(xs) + 1, max(ys) - min(ys) + 1
        assert 20 <= max(w, h) <= 25, (shape, w, h)
        fill = len(xs) / (
            w * h
        )  # how much of its bounding box the shape covers, and how wide its bottom row is
        bottom = sum(1 for y in ys if y == max(ys)) / w
        expected = {
            "square": fill >= 0.95,
            "circle": 0.7 <= fill <= 0.85 and bottom < 0.6,
            "triangle": 0.4 <= fill <= 0.62 and bottom >= 0.9,
            "cross": 0.5 <= fill <= 0.62 and bottom < 0.5,
        }
        assert expected[shape], (shape, fill, bottom)
        seen[shape] += 1
    assert set(seen) == set(SHAPES)


def test_splits_are_llava_json_with_two_questions_per_image_and_loadable_recipes(tmp_path, capsys):
    from mllm.data.recipe import load_recipe

    assert main([str(tmp_path), "--canvas", "224x112", "--train", "6", "--val", "3", "--test", "4"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {s: manifest["splits"][s]["questions"] for s in ("train", "val", "test")} == dict(
        train=12, val=6, test=8
    )
    test = json.loads((tmp_path / "test.json").read_text())
    assert Counter(s["question_type"] for s in test) == {"shape": 4, "color": 4}
    for s in test:
        assert Image.open(tmp_path / s["image"]).size == (224, 112)
        assert s["conversations"][0]["value"].startswith("<image>\n")
        assert s["conversations"][1]["value"] in (SHAPES if s["question_type"] == "shape" else tuple(COLORS))
    images = {
        split: {s["image"] for s in json.loads((tmp_path / f"{split}.json").read_text())}
        for split in ("train", "val", "test")
    }
    assert not (images["train"] & images["test"]) and not (images["val"] & images["test"])
    for split in ("train", "val", "test"):
        recipe = load_recipe(str(tmp_path / f"resolution_{split}.yaml"))
        assert recipe.sources[0].path == str(tmp_path / f"{split}.json")


def test_test_split_does_not_move_with_the_training_set_size(tmp_path):
    small = build_resolution_data(str(tmp_path / "a"), ResolutionTask(**SMALL))
    large = build_resolution_data(str(tmp_path / "b"), ResolutionTask(**{**SMALL, "train": 9}))
    assert small["splits"]["test"] == large["splits"]["test"]
    assert (tmp_path / "a/images/test/3.png").read_bytes() == (tmp_path / "b/images/test/3.png").read_bytes()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="shape_size"):
        ResolutionTask(canvas=(64, 32), shape_size=(20, 24))
    with pytest.raises(ValueError, match=">= 1 image"):
        ResolutionTask(test=0)
