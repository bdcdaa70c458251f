"""`Collator`: dataset items → a right-padded batch, images concatenated in sample order."""

from __future__ import annotations

from typing import Any

import torch

from mllm.data.encode import IGNORE_INDEX
from mllm.data.instruction import encode_instructions


def round_up(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (the padded row width of a micro-batch)."""
    return -(-width // multiple) * multiple


class Collator:
    """Pads `input_ids` with `pad_token_id` and `labels` with -100; drops `None` (skipped) items.

    `pad_to_multiple_of`: rows are padded to a multiple of this many tokens, so a run meets few distinct batch
    shapes (on CPU, oneDNN builds and keeps a matmul kernel per shape; on GPU, tensor cores want multiples of 8).
    `mask_free`: the batch carries no `attention_mask` — right padding only ever follows a row's real tokens, so
    causal attention alone is exact for them, and SDPA / flash-attn run their causal kernels, which skip the score
    blocks above the diagonal instead of computing every block and masking it.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int = 1,
        mask_free: bool = False,
        instruction_tokenizer=None,
        instruction_max_tokens: int = 128,
    ):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a real token id, got {pad_token_id}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_free = mask_free
        self.instruction_tokenizer = instruction_tokenizer
        """When set (an instruction-aware Q-Former's tokenizer), batches also carry each image's instruction ids
        `qformer_input_ids` / `qformer_attention_mask` [I, L] (items bring their `instruction` text)."""
        self.instruction_max_tokens = instruction_max_tokens

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            return {
                "input_ids": torch.zeros((0, 0), dtype=torch.long),
                "attention_mask": None if self.mask_free else torch.zeros((0, 0), dtype=torch.long),
                "labels": torch.zeros((0, 0), dtype=torch.long),
                "pixel_values": None,
                "image_counts": torch.zeros(0, dtype=torch.long),
                "sample_ids": [],
            }
        width = round_up(max(it["input_ids"].numel() for it in items), self.pad_to_multiple_of)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for b, it in enumerate(items):
            n = it["input_ids"].numel()
            input_ids[b, :n] = it["input_ids"]
            labels[b, :n] = it["labels"]
            attention_mask[b, :n] = 1
        pixels = [it["pixel_values"] for it in items if it["pixel_values"].shape[0] > 0]
        extra = self._instructions(items) if self.instruction_tokenizer is not None else {}
        return {
            **extra,
            "input_ids": input_ids,
            "attention_mask": None if self.mask_free else attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_counts": torch.tensor([it["pixel_values"].shape[0] for it in items], dtype=torch.long),
            "sample_ids": [it["id"] for it in items],
        }

    def _instructions(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
        texts = [
            it["instruction"] for it in items for _ in range(it["pixel_values"].shape[0])
        ]  # one per image
        if not texts:
            return {"qformer_input_ids": None, "qformer_attention_mask": None}
        ids, mask = encode_instructions(self.instruction_tokenizer, texts, self.instruction_max_tokens)
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}
