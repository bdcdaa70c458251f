"""`CachedFeatureDataset`: a training dataset whose items carry a frozen tower's cached features, not pixels.

The features come from a feature cache (`mllm.vision.cache.FeatureCache`, filled before training); this module
only reads them, so the data layer stays free of the model: anything with `get(image) -> [N, D]`, `fill(images)`
and a `tower` with `num_tokens` and `hidden_size` serves.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mllm.data.errors import BadSampleError
from mllm.data.sample import ImageRef


class FeatureStore(Protocol):
    """What the dataset needs of a feature cache (`mllm.vision.cache.FeatureCache` is one)."""

    tower: Any
    """Has `num_tokens` (N) and `hidden_size` (D): the shape of an empty sample's features [0, N, D]."""

    def get(self, image: ImageRef) -> torch.Tensor: ...

    def fill(self, images: list[ImageRef], batch_size: int = 32, progress: bool = True) -> int: ...


class CachedFeatureDataset(torch.utils.data.Dataset):
    """A `mllm.data.MultimodalDataset` whose items carry cached `features` [I, N, D] instead of `pixel_values`.

    Images are never decoded here (only hashed); lengths, image flags and items pass through, so the
    data layer's samplers work unchanged. Call `fill()` once before training.
    """

    def __init__(self, dataset, cache: FeatureStore):
        self.dataset = dataset
        self.cache = cache
        self.lengths = dataset.lengths
        self.has_image = dataset.has_image
        self.items = dataset.items
        self.weights = dataset.weights

    def __len__(self) -> int:
        return len(self.dataset)

    def image_sources(self, i: int) -> tuple[Any, Any, list[ImageRef]]:
        """(sample, encoded, image sources) of item `i`: the images that survived truncation, as paths or bytes."""
        item, reader = self.dataset.items[i], self.dataset.reader
        sample, enc = reader.encode(item.source, item.index)
        return sample, enc, reader.image_paths(sample, item.source, enc.num_images)

    def images(self) -> list[ImageRef]:
        """Every image the dataset's samples use, once each (a bad sample's are left out: it is skipped later)."""
        found: dict[Any, None] = {}
        for i in range(len(self)):
            try:
                found.update(dict.fromkeys(self.image_sources(i)[2]))
            except BadSampleError:
                continue
        return list(found)

    def fill(self, batch_size: int = 32, progress: bool = True) -> int:
        """Compute the features of every image of the dataset that the cache lacks; returns how many."""
        return self.cache.fill(self.images(), batch_size=batch_size, progress=progress)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        try:
            sample, enc, sources = self.image_sources(i)
        except BadSampleError as e:  # skipped and logged as the dataset itself would
            item = self.dataset.items[i]
            self.dataset._bad(self.dataset.reader.locate(e, item.source, item.index))
            return None
        if len(enc.input_ids) != self.lengths[i]:
            raise RuntimeError(
                f"sample {sample.id}: length changed from {self.lengths[i]} to {len(enc.input_ids)}"
            )
        feats = [self.cache.get(s) for s in sources]
        n, d = self.cache.tower.num_tokens, self.cache.tower.hidden_size
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "features": torch.stack(feats) if feats else torch.zeros((0, n, d)),
            "id": sample.id,
        }
