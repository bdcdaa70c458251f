"""The training data stream: recipe → dataset → this rank's micro-batches, endless over epochs, resumable.

The sampler owns the order; this stream only counts what was actually trained
on, so that a checkpoint records the exact position even while DataLoader
workers prefetch ahead.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import (
    IGNORE_INDEX,
    Collator,
    MixtureBatchSampler,
    build_dataset,
    causal_block_mask,
    load_recipe,
)
from mllm.data.features import CachedFeatureDataset
from mllm.train import distributed as dist
from mllm.train.config import TrainConfig
from mllm.train.stop import defer_stop_signals
from mllm.vision.cache import FeatureCache, fill_in_subprocess

log = logging.getLogger(__name__)

SKIPPED_FILE = "skipped_samples.jsonl"
"""In the output directory: one JSON line per bad sample met (kind, reason, source, line, id), from every rank
and DataLoader worker."""


@dataclass
class TrainData:
    recipe: Any
    dataset: Any
    """The `MultimodalDataset` (lengths, bad-sample log); the loader reads `items`, which is it or its cached view."""
    sampler: MixtureBatchSampler
    loader: torch.utils.data.DataLoader
    blank: BlankImageRow
    items: Any = None
    """What the loader reads: the dataset, or its `CachedFeatureDataset` when --feature-cache is set."""
    feature_cache_fill_s: float = 0.0
    """Seconds spent computing missing cached features before the first step (the run's time includes them)."""
    explicit_mask: ExplicitMask | None = None
    """Set for compiled decoder layers: every micro-batch then carries its exact 4D attention mask."""

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated micro-batch as the step takes it: a blank image row if it has no image; its mask spelled out."""
        batch = self.blank(batch)
        return self.explicit_mask(batch) if self.explicit_mask is not None else batch


@dataclass(frozen=True)
class ExplicitMask:
    """Replaces a batch's padding mask / packed position ids by the exact 4D mask they stand for.

    For compiled decoder layers: transformers uses a 4D mask as given, so the compiled graph sees a mask tensor
    on every batch, instead of `None` on one batch and a padding mask on the next (a recompile each time).
    Boolean for SDPA; with `additive_dtype`, the additive form eager attention adds to its scores (0 or the
    dtype's minimum). A mask-free batch (causal kernels, see `Collator`) stays as it is.
    """

    additive_dtype: torch.dtype | None = None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch.get("attention_mask") is None and batch.get("position_ids") is None:
            return batch
        mask = causal_block_mask(batch.get("position_ids"), batch.get("attention_mask"))  # [R, 1, W, W]
        if self.additive_dtype is not None:
            lowest = torch.finfo(self.additive_dtype).min
            mask = torch.zeros(mask.shape, dtype=self.additive_dtype).masked_fill(~mask, lowest)
        return {**batch, "attention_mask": mask}


@dataclass(frozen=True)
class BlankImageRow:
    """Adds a row holding one blank image and nothing to learn to a micro-batch that has no image.

    Then every process runs the vision tower and connector in every forward pass: under ZeRO-3 a process that
    skipped them while another ran them would wait forever in their parameter gathers, and with only the
    connector trainable (stage 1) a loss that never passed through it would have no gradient at all. The row
    attends only to itself and has no labels, so the loss and every gradient are exactly what they were.
    `image_key` / `image_shape`: what one image is in this run's batches (`pixel_values` [3, H, W], or cached
    tower `features` [N, D]).
    """

    pad_token_id: int
    image_tokens: int
    image_shape: tuple[int, ...]
    image_key: str = "pixel_values"
    instruction_pad_id: int | None = None
    """An instruction-aware Q-Former's pad id: the blank image then gets an empty instruction."""
    blank_size: tuple[int, int] | None = None
    """The (width, height) the blank image has in `image_sizes` (batches with sizes); it has `tiles` tiles."""
    tiles: int = 1

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch.get(self.image_key) is not None and batch[self.image_key].shape[0] > 0:
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
        if batch.get("attention_mask") is not None:
            attention_mask = widen(batch["attention_mask"], 0)
            attention_mask[rows, : self.image_tokens] = 1
        instruction = {}
        if self.instruction_pad_id is not None:
            instruction = {
                "qformer_input_ids": torch.full((1, 1), self.instruction_pad_id, dtype=torch.long),
                "qformer_attention_mask": torch.zeros((1, 1), dtype=torch.long),
            }
        position_ids = None
        if (
            batch.get("position_ids") is not None
        ):  # packed rows: the new columns and the blank row, own segments
            old = batch["position_ids"].shape[1]
            position_ids = widen(batch["position_ids"], 0)
            position_ids[:rows, old:] = torch.arange(width - old)
            position_ids[rows] = torch.arange(width)
        return {
            **batch,
            **instruction,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": widen(batch["labels"], IGNORE_INDEX),
            self.image_key: torch.zeros((self.tiles, *self.image_shape)),
            "image_sizes": None
            if self.blank_size is None
            else torch.tensor([self.blank_size], dtype=torch.long),
            "image_counts": torch.cat([batch["image_counts"], torch.ones(1, dtype=torch.long)]),
        }  # sample_ids and sample_lengths keep naming only the real samples


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
        recipe, tokenizer, model.image_layout, model.vision.preprocess, seed=cfg.seed, progress=progress
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
    items, fill_s = dataset, 0.0
    if cfg.feature_cache:
        items = CachedFeatureDataset(dataset, FeatureCache(cfg.feature_cache, model.vision))
        fill_s = fill_feature_cache(items, model, rank, world_size, progress)
    workers = cfg.num_workers
    loader = torch.utils.data.DataLoader(
        items,
        batch_sampler=sampler,
        collate_fn=Collator(
            tokenizer.pad_token_id,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
            mask_free=cfg.causal_kernel,
            pack=cfg.packing != "off",
            row_width=cfg.pack_row_tokens or None,
            instruction_tokenizer=instruction_tokenizer,
            instruction_max_tokens=model.config.connector.instruction_max_tokens,
        ),
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=workers > 0,  # no worker start-up (imports, dataset copy) at every epoch
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
        # Each new iterator draws a seed from this generator; from the global RNG it would shift dropout
        # masks by whether an epoch began before or after a resume.
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=defer_stop_signals,
    )
    instruction_pad_id = instruction_tokenizer.pad_token_id if instruction_tokenizer is not None else None
    if cfg.feature_cache:
        blank = BlankImageRow(
            tokenizer.pad_token_id,
            model.num_image_tokens,
            (model.vision.num_tokens, model.vision.hidden_size),
            "features",
            instruction_pad_id,
        )
    else:
        pixel_shape = tuple(model.vision.preprocess([Image.new("RGB", (8, 8))]).shape[1:])
        layout = model.image_layout
        side = (
            layout.tile_size,
            layout.tile_size,
        )  # a blank tower-sized square: one tile, or a thumbnail + one
        blank = BlankImageRow(
            tokenizer.pad_token_id,
            layout.num_tokens(side),
            pixel_shape,
            instruction_pad_id=instruction_pad_id,
            blank_size=side,
            tiles=layout.num_tiles(side),
        )
    return TrainData(recipe, dataset, sampler, loader, blank, items, fill_s)


def fill_feature_cache(
    items: CachedFeatureDataset, model, rank: int, world_size: int, progress: bool = False
) -> float:
    """Compute the cached features this run lacks, before the first step (`progress`: a bar of this rank's share);
    returns the seconds it took.

    Each rank computes its share of the missing images in a child process (which gives back the fill's memory
    when it exits) with its own copy of the tower, then every rank waits for all; entries are written atomically,
    so ranks and workers filling the same folder at once never see half an entry.
    """
    started = time.perf_counter()
    images = items.images()
    tower_dtype = next(model.vision.parameters()).dtype
    filled = fill_in_subprocess(
        model.config.vision,
        tower_dtype,
        items.cache.root,
        images[rank::world_size],
        parent=items.cache,
        progress=progress,
    )
    dist.barrier()
    seconds = time.perf_counter() - started
    if filled or rank == 0:
        log.info(
            "feature cache %s: %d image(s) computed here, %d in all, %.1f s",
            items.cache.dir,
            filled,
            len(images),
            seconds,
        )
    return seconds


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
            return self.data.prepare(batch)
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


MODEL_INPUTS = (
    "input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "features", "image_counts", "sample_ids",
    "image_sizes",
    "qformer_input_ids", "qformer_attention_mask",  # an instruction-aware Q-Former's instruction text
)  # fmt: skip
"""The keys of a micro-batch that `MultimodalLM.forward` takes (the rest is accounting: sample lengths, images)."""


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model's arguments from a micro-batch, tensors moved to `device` (asynchronously from pinned memory)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
        if k in MODEL_INPUTS
    }


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Positions the loss is computed at (the label of the next token is supervised)."""
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.numel() else 0
