"""The training data stream: recipe → dataset → this rank's micro-batches, endless over epochs, resumable.

The sampler owns the order; this stream only counts what was actually trained
on, so that a checkpoint records the exact position even while DataLoader
workers prefetch ahead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import IGNORE_INDEX, Collator, MixtureBatchSampler, build_dataset, load_recipe
from mllm.train.config import TrainConfig
from mllm.train.stop import defer_stop_signals

SKIPPED_FILE = "skipped_samples.jsonl"
"""In the output directory: one JSON line per bad sample met (kind, reason, source, line, id), from every rank
and DataLoader worker."""


@dataclass
class TrainData:
    recipe: Any
    dataset: Any
    sampler: MixtureBatchSampler
    loader: torch.utils.data.DataLoader
    blank: BlankImageRow


@dataclass(frozen=True)
class BlankImageRow:
    """Adds a row holding one blank image and nothing to learn to a micro-batch that has no image.

    Then every process runs the vision tower and connector in every forward pass: under ZeRO-3 a process that
    skipped them while another ran them would wait forever in their parameter gathers, and with only the
    connector trainable (stage 1) a loss that never passed through it would have no gradient at all. The row
    attends only to itself and has no labels, so the loss and every gradient are exactly what they were.
    """

    pad_token_id: int
    image_tokens: int
    pixel_shape: tuple[int, ...]
    instruction_pad_id: int | None = None
    """An instruction-aware Q-Former's pad id: the blank image then gets an empty instruction."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["pixel_values"] is not None and batch["pixel_values"].shape[0] > 0:
            return batch
        rows, width = batch["input_ids"].shape
        width = max(width, self.image_tokens)

        def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.full((rows + 1, width), fill, dtype=torch.long)
            out[:rows, : t.shape[1]] = t
            return out

        input_ids = widen(batch["input_ids"], self.pad_token_id)
        input_ids[rows, : self.image_tokens] = IMAGE_TOKEN_ID
        attention_mask = None  # a mask-free batch stays one: the blank row is right-padded too
        if batch["attention_mask"] is not None:
            attention_mask = widen(batch["attention_mask"], 0)
            attention_mask[rows, : self.image_tokens] = 1
        instruction = {}
        if self.instruction_pad_id is not None:
            instruction = {
                "qformer_input_ids": torch.full((1, 1), self.instruction_pad_id, dtype=torch.long),
                "qformer_attention_mask": torch.zeros((1, 1), dtype=torch.long),
            }
        return {
            **batch,
            **instruction,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": widen(batch["labels"], IGNORE_INDEX),
            "pixel_values": torch.zeros((1, *self.pixel_shape)),
            "image_counts": torch.cat([batch["image_counts"], torch.ones(1, dtype=torch.long)]),
        }  # sample_ids keep naming only the real samples


def train_recipe(cfg: TrainConfig):
    """The run's data recipe, with the run's --template, --max-length and --image-root overrides applied."""
    overrides = {"template": cfg.template, "max_length": cfg.max_length, "image_root": cfg.image_root}
    return load_recipe(cfg.data, **{k: v for k, v in overrides.items() if v})


def build_train_data(
    cfg: TrainConfig, tokenizer, model, rank: int, world_size: int, progress: bool
) -> TrainData:
    recipe = train_recipe(cfg)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"{cfg.llm}: the tokenizer has no pad token; set pad_token in its tokenizer_config.json"
        )
    dataset = build_dataset(
        recipe, tokenizer, model.num_image_tokens, model.vision.preprocess, seed=cfg.seed, progress=progress
    )
    found_while_reading = dataset.skipped()  # the same on every rank
    dataset.skip_log = str(Path(cfg.output) / SKIPPED_FILE)
    if rank == 0 and found_while_reading:  # DataLoader workers append the ones they meet
        with open(dataset.skip_log, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in found_while_reading)
    # An instruction-aware Q-Former reads each image's instruction in its own tokenizer's ids.
    instruction_tokenizer = model.connector.tokenizer if model.config.connector.instruction_aware else None
    sampler = MixtureBatchSampler(
        dataset,
        cfg.micro_batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        max_tokens=cfg.max_tokens or None,
    )
    if len(sampler) == 0:
        raise ValueError(f"{cfg.data}: no micro-batches for rank {rank} of {world_size}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collator(
            tokenizer.pad_token_id,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
            mask_free=cfg.causal_kernel,
            instruction_tokenizer=instruction_tokenizer,
            instruction_max_tokens=model.config.connector.instruction_max_tokens,
        ),
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
        # Each new iterator draws a seed from this generator; from the global RNG it would shift dropout
        # masks by whether an epoch began before or after a resume.
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=defer_stop_signals,
    )
    pixel_shape = tuple(model.vision.preprocess([Image.new("RGB", (8, 8))]).shape[1:])
    return TrainData(
        recipe,
        dataset,
        sampler,
        loader,
        BlankImageRow(
            tokenizer.pad_token_id,
            model.num_image_tokens,
            pixel_shape,
            instruction_tokenizer.pad_token_id if instruction_tokenizer is not None else None,
        ),
    )


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
            return self.data.blank(batch)
        raise RuntimeError("the data sampler yielded no batch for a whole epoch")

    def close(self) -> None:
        """Shut the DataLoader workers down now. Dropping the iterator is not enough when an exception's
        traceback still holds it: the workers would live until interpreter exit, where multiprocessing stops them
        with SIGTERM (deferred by our workers) and waits. `_shutdown_workers` is what the iterator's own
        `__del__` runs."""
        it, self._it = self._it, None
        shutdown = getattr(
            it, "_shutdown_workers", None
        )  # absent on a single-process (num_workers=0) iterator
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, Any]:
        state = self.data.sampler.state_dict(consumed=self._consumed)
        state["epoch"] = self._epoch
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.sampler.load_state_dict(state)
        self._it = None
        self._epoch, self._consumed = self.data.sampler.epoch, self.data.sampler.position

    @property
    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (for logs)."""
        sampler = self.data.sampler
        done = sampler.state_dict(consumed=self._consumed)["global_position"]
        return self._epoch + min(1.0, done / max(1, len(sampler) * sampler.world_size))


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Positions the loss is computed at (the label of the next token is supervised)."""
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if labels.numel() else 0
