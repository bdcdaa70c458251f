"""A tiny benchmark work in the layout of the shared `make_work.py`, for tests: seconds to build, seconds to run.

vision/  tiny CLIP vision tower + image processor     llm/  tiny Llama + BPE tokenizer with an <image> token
images/  JPEGs      pretrain.json, instruct.json  LLaVA conversation data (stage 2: varied lengths, some text-only)
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
from PIL import Image

from mllm.config import IMAGE_PLACEHOLDER
from mllm.testing.backbones import TinySize, make_llm, make_vision

_WORDS = "the a image shows dog cat red blue table window sky people small large left right two three".split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_tiny_work(out: str, samples: int = 24, seed: int = 0) -> str:
    """Write the tiny work to `out` (idempotent per call: files are overwritten) and return `out`."""
    rng = random.Random(seed)
    size = TinySize()
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    make_vision("clip", os.path.join(out, "vision"), size, seed=seed)
    make_llm("llama", os.path.join(out, "llm"), size, seed, IMAGE_PLACEHOLDER, tie_word_embeddings=False)
    g = np.random.default_rng(seed)
    for i in range(samples):
        Image.fromarray(g.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            os.path.join(out, "images", f"{i:04d}.jpg")
        )
    pretrain = [
        {
            "id": f"p{i}",
            "image": f"{i:04d}.jpg",
            "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nDescribe the image."},
                {"from": "gpt", "value": _text(rng, 3, 12)},
            ],
        }
        for i in range(samples)
    ]
    instruct = []
    for i in range(samples):
        turns = rng.choice([1, 1, 2, 3])
        conv = []
        for _ in range(turns):
            conv += [
                {"from": "human", "value": _text(rng, 3, 8)[:-1] + "?"},
                {"from": "gpt", "value": _text(rng, 1, rng.choice([4, 20, 40]))},
            ]
        rec = {"id": f"i{i}", "conversations": conv}
        if i % 6:  # every sixth sample is text-only
            rec["image"] = f"{i:04d}.jpg"
            conv[0]["value"] = f"{IMAGE_PLACEHOLDER}\n" + conv[0]["value"]
        instruct.append(rec)
    for name, records in (("pretrain.json", pretrain), ("instruct.json", instruct)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(records, f)
    return out
