"""`MultimodalDataset`: the recipe's samples as token ids, labels and pixel values, with exact lengths known up front.

Building the dataset reads and tokenises every selected sample once (text
only, no images; cached on disk, parallel when large) to learn its exact
length, so batches can be grouped by length before training; text-level
problems surface here, before any compute is spent. Images are opened lazily
in `__getitem__`, where image problems surface. Either way a bad sample stops
the run (`on_bad_sample: error`) or is logged and recorded (`skip`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mllm.data.errors import BadSampleError
from mllm.data.instruction import instruction_text
from mllm.data.layout import ImageLayout
from mllm.data.reader import SampleReader, open_reader
from mllm.data.recipe import Recipe, SourceSpec
from mllm.data.scan import ScanResult, cached_length_scan

log = logging.getLogger("mllm.data")

Preprocess = Callable[[list[Image.Image]], torch.Tensor]


def select_indices(spec: SourceSpec, n: int, seed: int) -> list[int]:
    """Record indices a source's `sample:` keeps: all, the first N, N at random (seeded), or the first P%."""
    s = spec.sample
    if s == "all":
        return list(range(n))
    if s.startswith("random:"):
        k = min(int(s.split(":", 1)[1]), n)
        return sorted(random.Random(f"{seed}:{spec.name}").sample(range(n), k))
    if s.endswith("%"):
        return list(range(round(n * float(s[:-1]) / 100)))
    return list(range(min(int(s), n)))


def recipe_tasks(reader: SampleReader, seed: int) -> list[tuple[int, int]]:
    """(source position, record index) of every sample the recipe selects, in recipe order."""
    return [
        (si, idx) for si, src in enumerate(reader.sources) for idx in select_indices(src.spec, len(src), seed)
    ]


@dataclass
class Item:
    source: int
    """Position of the source in the recipe."""
    index: int
    """Record index inside that source."""


class MultimodalDataset(torch.utils.data.Dataset):
    """Map-style dataset over a recipe's sources. `lengths[i]` is sample i's exact token count (images expanded)."""

    def __init__(self, reader: SampleReader, scanned: ScanResult, preprocess: Preprocess | None):
        self.reader = reader
        self.recipe = reader.recipe
        self.preprocess = preprocess
        self.source_names = [s.name for s in reader.sources]
        self.weights = (
            [s.spec.weight for s in reader.sources] if self.recipe.sources[0].weight is not None else None
        )
        self.skip_log: str | None = None
        """If set, every sample skipped in `__getitem__` is appended there as a JSON line (DataLoader workers too)."""
        self._skipped: list[dict[str, Any]] = []
        self._pixel_shape = (
            tuple(preprocess([Image.new("RGB", (8, 8))]).shape[1:]) if preprocess else (3, 0, 0)
        )
        for k in sorted(scanned.bad):
            self._bad(BadSampleError(**_error_fields(scanned.bad[k])))
        good = scanned.length >= 0
        self.items = [
            Item(int(s), int(i)) for s, i in zip(scanned.source[good], scanned.index[good], strict=True)
        ]
        self.lengths: list[int] = scanned.length[good].tolist()
        self.has_image: list[bool] = scanned.has_image[good].tolist()
        self.truncated: list[int] = [
            k
            for k, (n, full) in enumerate(zip(self.lengths, scanned.full_length[good].tolist(), strict=True))
            if full > n
        ]
        """Positions of samples cut to max_length (their first answer survived)."""
        if self._skipped:
            log.warning(
                "%s: skipped %d bad sample(s) while reading the data", self.recipe.name, len(self._skipped)
            )
        if self.truncated:
            log.info(
                "%s: %d sample(s) truncated to max_length=%s",
                self.recipe.name,
                len(self.truncated),
                self.recipe.max_length,
            )
        if not self.items:
            raise ValueError(f"recipe {self.recipe.name!r}: no usable samples")

    @property
    def sources(self):
        return self.reader.sources

    def encode(self, si: int, idx: int):
        """(Sample, Encoded) of record `idx` of source `si` (no images opened)."""
        return self.reader.encode(si, idx)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = self.items[i]
        try:
            sample, enc = self.reader.encode(item.source, item.index)
            images = self.reader.load_images(sample, item.source, enc.image_tokens)
        except BadSampleError as e:
            self._bad(self.reader.locate(e, item.source, item.index))
            return None
        if len(enc.input_ids) != self.lengths[i]:
            raise RuntimeError(
                f"sample {sample.id}: length changed from {self.lengths[i]} to {len(enc.input_ids)} since the scan; "
                "was the data file edited during training?"
            )
        pixels, sizes = image_inputs(self.reader.layout, images, self.preprocess, self._pixel_shape)
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": pixels,  # [tiles, 3, H, W]: every tile of every image, image by image
            "image_sizes": sizes,  # [images, 2]: (width, height) each image was used at
            "instruction": instruction_text(sample.messages),  # read only by an instruction-aware Q-Former
            "id": sample.id,
            "source": self.source_names[item.source],
            "index": item.index,
        }

    # ---- bad samples ------------------------------------------------------------------------------
    def _bad(self, e: BadSampleError) -> None:
        if self.recipe.on_bad_sample == "error":
            raise e
        log.warning("skipping %s", e)
        record = e.record()
        self._skipped.append(record)
        if self.skip_log:
            with open(self.skip_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def skipped(self) -> list[dict[str, Any]]:
        """Every sample skipped so far and why: while building, and in `__getitem__` (all workers, via `skip_log`)."""
        records = list(self._skipped)
        if self.skip_log:
            try:
                with open(self.skip_log, encoding="utf-8") as f:
                    records += [json.loads(line) for line in f if line.strip()]
            except FileNotFoundError:
                pass
        unique = {
            json.dumps(r, sort_keys=True): r for r in records
        }  # a sample skipped every epoch counts once
        return list(unique.values())


def _error_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": record["kind"],
        "reason": record["reason"],
        "source": record["source"],
        "index": record["index"],
        "line": record["line"],
        "sample_id": record["id"],
    }


def image_inputs(
    layout: ImageLayout, images: list[Image.Image], preprocess: Preprocess | None, pixel_shape: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's decoded images → (tower inputs of their tiles [T, 3, H, W], sizes used [I, 2]) per `layout`.

    Without `preprocess` (length-only uses) the pixels are an empty [0, *pixel_shape]; the sizes are still given.
    """
    if preprocess is None or not images:
        sizes = [layout.fit(*im.size) for im in images]
        return torch.zeros((0, *pixel_shape)), torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    pixels, sizes = layout.pixels(images, preprocess)
    return pixels.float(), sizes


def build_dataset(
    recipe: Recipe,
    tokenizer,
    image_tokens: int | ImageLayout,
    preprocess: Preprocess | None,
    seed: int = 0,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> MultimodalDataset:
    """Open the recipe's sources and learn every sample's exact length (cached; parallel when large; progress bar).

    `image_tokens`: the model's `image_layout` (images → tiles and token counts), or one token count per image.
    `seed` picks `random:N` subsets. `workers`: scan processes (None = automatic).
    """
    reader = open_reader(recipe, tokenizer, image_tokens)
    scanned = cached_length_scan(reader, recipe_tasks(reader, seed), workers=workers, progress=progress)
    return MultimodalDataset(reader, scanned, preprocess)
