"""`mllm train --mir-data`: the Modality Integration Rate (`mllm.model.alignment`) measured as the run trains.

The samples go through the run's own data pipeline — its template, system prompt and length budget, its image
layout and preprocessing, its collator (unpacked, with a padding mask) — so what is measured is what is trained.
"""

from __future__ import annotations

import dataclasses

import torch

from mllm.data import build_dataset, load_recipe
from mllm.data.collate import Collator
from mllm.model.alignment import modality_integration_rate


class AlignmentProbe:
    """Fixed samples (an image and its reference text each), read and checked when made; `measure(model)` scores
    the model as it is now, in eval mode (no dropout), and puts it back. Under ZeRO-3 every rank must call it,
    together (the weights are gathered collectively)."""

    def __init__(self, path: str, run_recipe, tokenizer, model, image_root: str = "", batch_size: int = 16):
        recipe = load_recipe(path, image_root=image_root or None)
        recipe = dataclasses.replace(
            recipe,
            template=run_recipe.template,
            system_prompt=run_recipe.system_prompt,
            max_length=run_recipe.max_length,
            on_bad_sample="error",
        )
        self.dataset = build_dataset(
            recipe, tokenizer, model.image_layout, model.vision.preprocess, progress=False
        )
        without_image = self.dataset.has_image.count(False)
        if without_image or not len(self.dataset):
            raise ValueError(
                f"--mir-data {path}: every sample needs an image ({without_image} of {len(self.dataset)} have none)"
            )
        self.collate = Collator(tokenizer.pad_token_id)
        self.batch_size = batch_size

    def batches(self, device):
        n = len(self.dataset)
        for start in range(0, n, self.batch_size):
            rows = [self.dataset[i] for i in range(start, min(start + self.batch_size, n))]
            batch = self.collate([r for r in rows if r is not None])
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def measure(self, model) -> dict:
        device = next(model.connector.parameters()).device
        was_training = model.training
        model.eval()
        try:
            return modality_integration_rate(model, self.batches(device))
        finally:
            model.train(was_training)
