"""A task that needs resolution: one small shape somewhere on a large canvas (easy-VQA style, built offline).

Each image is a wide white canvas (896×448 by default) with a few grey specks of clutter and one small
coloured shape (circle, square, triangle or cross, 20-32 px) at a random place. Two questions are asked
about it: "What shape is on the canvas?" (needs the detail: squashed to a 224-px square the shape is a
6×12-px smudge) and "What colour is the shape?" (a control: colour survives the squash). Written as
LLaVA-format JSON with train / validation / test splits; the test split is for the one final measurement.

Layout under the output folder (the shipped `data_recipes/resolution_*.yaml` recipes name these files
relative to their own folder, and the builder copies them there):

    images/<split>/<n>.png
    train.json, val.json, test.json   one question per sample, each with its `question_type` (shape | color)
    manifest.json                     what was built, with which settings, and the answer counts per split

`python -m mllm.demo.resolution OUT [--canvas 896x448] [--train 2000 --val 300 --test 600]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mllm.config import IMAGE_PLACEHOLDER

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "orange": (240, 140, 0)}
QUESTIONS = {"shape": "What shape is on the canvas?", "color": "What colour is the shape?"}
SPLITS = ("train", "val", "test")
RECIPES = ("resolution_train.yaml", "resolution_val.yaml", "resolution_test.yaml")


@dataclass
class ResolutionTask:
    """What the builder draws: how many images per split, how large, how small the shape."""

    train: int = 2000
    """Training images (two questions each: shape and colour)."""
    val: int = 300
    """Validation images, for choosing settings."""
    test: int = 600
    """Held-out test images, touched once for the final figures."""
    canvas: tuple[int, int] = (896, 448)
    """Canvas width × height in pixels."""
    shape_size: tuple[int, int] = (20, 32)
    """Smallest and largest side of the shape, in pixels."""
    clutter: int = 6
    """Grey specks (3-6 px) scattered on every canvas, so that "the only mark" is not the answer's cue."""
    seed: int = 0

    def __post_init__(self):
        self.canvas, self.shape_size = tuple(self.canvas), tuple(self.shape_size)
        if min(self.train, self.val, self.test) < 1:
            raise ValueError(
                f"every split needs >= 1 image, got train {self.train}, val {self.val}, test {self.test}"
            )
        low, high = self.shape_size
        if not 4 <= low <= high or 2 * high >= min(self.canvas):
            raise ValueError(
                f"shape_size {self.shape_size} must satisfy 4 <= low <= high < half the canvas side {min(self.canvas)}"
            )
        if self.clutter < 0:
            raise ValueError(f"clutter must be >= 0, got {self.clutter}")


def draw_canvas(rng: random.Random, task: ResolutionTask) -> tuple[Image.Image, str, str]:
    """One canvas: (RGB image, its shape's name, its colour's name)."""
    width, height = task.canvas
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(task.clutter):
        r, x, y = rng.randint(2, 3), rng.randrange(width), rng.randrange(height)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(170, 170, 170))
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    side = rng.randint(*task.shape_size)
    x0, y0 = rng.randrange(4, width - side - 4), rng.randrange(4, height - side - 4)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    else:  # cross: two bars a third of the side thick
        t = side / 3
        draw.rectangle((x0 + t, y0, x0 + 2 * t, y0 + side), fill=fill)
        draw.rectangle((x0, y0 + t, x0 + side, y0 + 2 * t), fill=fill)
    return image, shape, color


def build_resolution_data(out: str, task: ResolutionTask) -> dict:
    """Draw every split's canvases into `out`/images and write the JSON files above; returns the manifest."""
    manifest: dict = {"settings": asdict(task), "splits": {}}
    for split_index, split in enumerate(SPLITS):
        rng = random.Random(
            f"{task.seed}-{split_index}"
        )  # one stream per split: test never shifts with train's size
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        samples = []
        for n in range(getattr(task, split)):
            image, shape, color = draw_canvas(rng, task)
            path = f"images/{split}/{n}.png"
            image.save(os.path.join(out, path))
            for kind, answer in (("shape", shape), ("color", color)):
                samples.append(_sample(f"{split}-{n}-{kind}", path, kind, answer))
        if split == "train":
            rng.shuffle(samples)
        _write_json(os.path.join(out, f"{split}.json"), samples)
        manifest["splits"][split] = {
            "images": getattr(task, split),
            "questions": len(samples),
            "answers": dict(sorted(Counter(s["conversations"][1]["value"] for s in samples).items())),
        }
    _write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def _sample(sample_id: str, image: str, kind: str, answer: str) -> dict:
    return {
        "id": sample_id,
        "image": image,
        "question_type": kind,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{QUESTIONS[kind]}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from mllm.demo.pipeline import shipped_recipes_dir

    p = argparse.ArgumentParser(prog="python -m mllm.demo.resolution", description=__doc__.split("\n")[0])
    p.add_argument("output", help="folder to write images, JSON and recipes into")
    p.add_argument("--canvas", default="896x448", help="canvas WIDTHxHEIGHT in pixels (default 896x448)")
    p.add_argument("--train", type=int, default=ResolutionTask.train)
    p.add_argument("--val", type=int, default=ResolutionTask.val)
    p.add_argument("--test", type=int, default=ResolutionTask.test)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        width, height = (int(v) for v in args.canvas.lower().split("x"))
    except ValueError:
        p.error(f"--canvas must be WIDTHxHEIGHT, e.g. 896x448; got {args.canvas!r}")
    task = ResolutionTask(
        train=args.train, val=args.val, test=args.test, canvas=(width, height), seed=args.seed
    )
    manifest = build_resolution_data(args.output, task)
    for name in RECIPES:  # the shipped recipes name their files relative to their own folder
        shutil.copyfile(shipped_recipes_dir() / name, Path(args.output) / name)
    print(json.dumps(manifest["splits"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
