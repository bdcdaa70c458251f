"""The training data stream: recipe → dataset → this rank's micro-batches, endless over epochs, resumable.

The sampler owns the order; this stream only counts what was actually trained
on, so that a checkpoint records the exact position even while DataLoader
workers prefetch ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mllm.data import Collator, MixtureBatchSampler, build_dataset, load_recipe
from mllm.train.config import TrainConfig


@dataclass
class TrainData:
    recipe: Any
    dataset: Any
    sampler: MixtureBatchSampler
    loader: torch.utils.data.DataLoader


def build_train_data(
    cfg: TrainConfig, tokenizer, model, rank: int, world_size: int, progress: bool
) -> TrainData:
    overrides = {"template": cfg.template or None, "max_length": cfg.max_length or None}
    recipe = load_recipe(cfg.data, **overrides)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"{cfg.llm}: the tokenizer has no pad token; set pad_token in its tokenizer_config.json"
        )
    dataset = build_dataset(
        recipe, tokenizer, model.num_image_tokens, model.vision.preprocess, seed=cfg.seed, progress=progress
    )
    sampler = MixtureBatchSampler(
        dataset, cfg.micro_batch_size, seed=cfg.seed, rank=rank, world_size=world_size
    )
    if len(sampler) == 0:
        raise ValueError(f"{cfg.data}: no micro-batches for rank {rank} of {world_size}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collator(tokenizer.pad_token_id),
        num_workers=cfg.num_workers,
        # Each new iterator draws a seed from this generator; from the global RNG it would shift dropout
        # masks by whether an epoch began before or after a resume.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return TrainData(recipe, dataset, sampler, loader)


class BatchStream:
    """Micro-batches across epoch boundaries; `state_dict()` = the sampler position after the last one handed out."""

    def __init__(self, data: TrainData):
        self.data = data
        self._it = None
        self._epoch = 0
        self._consumed = 0

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.data.loader)
                self._started = False
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            if not self._started:  # the sampler's generator has run now: its epoch and start are known
                self._epoch, self._consumed, self._started = (
                    self.data.sampler.epoch,
                    self.data.sampler.start_position,
                    True,
                )
            self._consumed += 1
            return batch
        raise RuntimeError("the data sampler yielded no batch for a whole epoch")

    def state_dict(self) -> dict[str, Any]:
        state = self.data.sampler.state_dict(consumed=self._consumed)
        state["epoch"] = self._epoch
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.sampler.load_state_dict(state)
        self._it = None
        self._epoch, self._consumed = int(state["epoch"]), int(state["position"])

    @property
    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (for logs)."""
        return self._epoch + self._consumed / max(1, len(self.data.sampler))


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Positions the loss is computed at (the label of the next token is supervised)."""
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if labels.numel() else 0
