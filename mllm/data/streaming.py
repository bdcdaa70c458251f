"""`StreamingDataset`: webdataset shards read sequentially, for data that does not fit on one disk.

Shards are shuffled per epoch (seeded) and dealt out to ranks, then to
DataLoader workers, so every shard is read by exactly one worker. Items have
the same shape as `MultimodalDataset` items; bad samples follow the recipe's
`on_bad_sample` (with `skip`, the item is None and the Collator drops it).
Lengths are not known up front, so length grouping is not available here.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import torch

from mllm.data.dataset import Preprocess, as_layout, image_inputs
from mllm.data.encode import ConversationEncoder
from mllm.data.errors import BadSampleError
from mllm.data.images import open_image
from mllm.data.instruction import instruction_text
from mllm.data.recipe import Recipe
from mllm.data.sample import validate
from mllm.data.sources import source_format
from mllm.data.sources.webdataset import expand_shards, read_shard, shard_sample

log = logging.getLogger("mllm.data")


class StreamingDataset(torch.utils.data.IterableDataset):
    def __init__(
        self,
        recipe: Recipe,
        encoder: ConversationEncoder,
        preprocess: Preprocess | None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        layout=None,
    ):
        self.recipe = recipe
        self.encoder = encoder
        self.layout = layout or as_layout(encoder.image_tokens)
        self.preprocess = preprocess
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.shards = [(spec.name, p) for spec in recipe.sources for p in expand_shards(spec.path)]
        if not self.shards:
            raise FileNotFoundError(f"recipe {recipe.name!r}: no webdataset shards found")
        self.skip_log: str | None = None
        self._skipped: list[dict[str, Any]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[tuple[str, str]]:
        shards = list(self.shards)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        return shards[self.rank * workers + wid :: self.world_size * workers]

    def __iter__(self):
        for name, path in self.my_shards():
            for n, (key, files) in enumerate(read_shard(path)):
                item = self._item(name, path, n, key, files)
                if item is not None or self.recipe.on_bad_sample == "skip":
                    yield item

    def _item(self, name, path, n, key, files) -> dict[str, Any] | None:
        try:
            sample = shard_sample(key, files, next(s.prompt for s in self.recipe.sources if s.name == name))
            if self.recipe.system_prompt and not any(m["role"] == "system" for m in sample.messages):
                sample.messages.insert(0, {"role": "system", "content": self.recipe.system_prompt})
            validate(sample)
            images = [
                open_image(r, self.recipe.image_root, self.recipe.max_image_pixels) for r in sample.images
            ]
            counts = self.layout.token_counts([im.size for im in images])
            enc = self.encoder.encode_full(sample.messages, image_tokens=counts)
        except BadSampleError as e:
            err = e.located(source=f"{name}:{path}", index=n, line=None, sample_id=key)
            if self.recipe.on_bad_sample == "error":
                raise err from None
            log.warning("skipping %s", err)
            self._skipped.append(err.record())
            if self.skip_log:
                with open(self.skip_log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(err.record()) + "\n")
            return None
        pixels, sizes = image_inputs(self.layout, images, self.preprocess, (3, 0, 0))
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": pixels,
            "image_sizes": sizes,
            "instruction": instruction_text(sample.messages),  # read only by an instruction-aware Q-Former
            "id": sample.id,
            "source": name,
            "index": n,
        }

    def skipped(self) -> list[dict[str, Any]]:
        return list(self._skipped)


def build_streaming_dataset(
    recipe: Recipe,
    tokenizer,
    image_tokens,
    preprocess: Preprocess | None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> StreamingDataset:
    """A dataset over a recipe whose sources are all webdataset shards."""
    for spec in recipe.sources:
        if source_format(spec) != "webdataset":
            raise ValueError(
                f"source {spec.name!r} is not webdataset shards; use build_dataset for this recipe"
            )
    layout = as_layout(image_tokens)  # the model's ImageLayout, or one token count per image
    encoder = ConversationEncoder(tokenizer, recipe.template, layout.tile_tokens, recipe.max_length)
    return StreamingDataset(
        recipe, encoder, preprocess, seed=seed, rank=rank, world_size=world_size, layout=layout
    )
