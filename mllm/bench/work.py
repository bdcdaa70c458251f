"""The benchmark work on disk (built by the shared `make_work.py`) and its stage data, tokenised by `mllm.data`.

Both sides of the bench train on the token ids and labels `mllm.data` makes
(assistant tokens supervised, each `<image>` expanded to the visual token
count), so they see exactly the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

STAGE_FILES = {1: "pretrain.json", 2: "instruct.json"}


@dataclass(frozen=True)
class Work:
    root: str

    @property
    def vision(self) -> str:
        return os.path.join(self.root, "vision")

    @property
    def llm(self) -> str:
        return os.path.join(self.root, "llm")

    @property
    def images(self) -> str:
        return os.path.join(self.root, "images")

    def data_file(self, stage: int) -> str:
        if stage not in STAGE_FILES:
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        return os.path.join(self.root, STAGE_FILES[stage])

    def check(self) -> Work:
        missing = [
            p
            for p in (self.vision, self.llm, *(self.data_file(s) for s in STAGE_FILES))
            if not os.path.exists(p)
        ]
        if missing:
            raise FileNotFoundError(
                f"benchmark work incomplete in {self.root}: missing {', '.join(missing)}; "
                f"build it with `python shared/bench/make_work.py {self.root}`"
            )
        return self


def write_recipe(work: Work, stage: int, folder: str, samples: int | None = None) -> str:
    """A data recipe (YAML) for the stage's file in `folder`: images under WORK/images, the first `samples` records
    (or all). Both sides read their data through it, so they train on the same records."""
    import yaml

    source = {"path": work.data_file(stage), "sample": str(samples) if samples else "all"}
    path = os.path.join(folder, f"stage{stage}_recipe.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"name": f"bench-stage{stage}", "image_root": work.images, "sources": [source]}, f)
    return path


def recipe_dataset(recipe_path: str, tokenizer, image_tokens: int, preprocess):
    """The recipe's `MultimodalDataset` as `mllm.data` builds it (exact lengths known up front)."""
    from mllm.data import build_dataset, load_recipe

    return build_dataset(load_recipe(recipe_path), tokenizer, image_tokens, preprocess, progress=False)


def encoded_item(dataset, i: int):
    """(sample, encoded ids/labels, absolute image paths) of item `i` of a `MultimodalDataset`, without decoding images."""
    item, reader = dataset.items[i], dataset.reader
    sample, enc = reader.encode(item.source, item.index)
    return sample, enc, reader.image_paths(sample, item.source, enc.num_images)
