"""`Collator`: dataset items → one micro-batch; the one collator of training, packed or padded.

Without packing each sample gets a row of its own, right-padded. With packing
(`pack=True`) rows are filled first-fit-decreasing with whole samples up to a
row width (`row_width`, default: the longest sample of the micro-batch, so no
row is longer than the padded batch would be and attention never costs more).
Each packed sample's position ids start at 0 and the batch carries no
`attention_mask`: transformers then finds the sample boundaries from the
position ids (`masking_utils.find_packed_sequence_indices`) and builds a
block-diagonal causal mask (flash-attn varlen on GPU), so a packed row computes
exactly what the samples compute one by one. The first label of every sample
is ignored, so no sample is trained to predict the start of its neighbour (a
padded row never uses its first label either). Images (`pixel_values`, or
cached `features`) are concatenated in row-major token order, as
`MultimodalLM.embed` splices them.

A micro-batch in which no two samples share a row goes out, with `mask_free`,
with neither mask nor position ids: its padding only ever follows the real
tokens, so causal attention alone is exact for all of them, and SDPA / flash-
attn run their causal kernels, which skip the score blocks above the diagonal.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm.config import IGNORE_INDEX
from mllm.data.instruction import encode_instructions


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit-decreasing: item indices grouped into rows whose total length is at most `width`."""
    if lengths and max(lengths) > width:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {width}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def round_up(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (the padded row width of a micro-batch)."""
    return -(-width // multiple) * multiple


class Collator:
    """Dataset items (`input_ids`, `labels`, `pixel_values` or `features`, `id`; `None` = skipped) → a batch.

    The batch has `input_ids` and `labels` [R, W]; `attention_mask` [R, W] (one right-padded sample per row and
    `mask_free` off) or None; `position_ids` [R, W] (packed rows sharing a row) or None; `pixel_values` or
    `features` (images in row-major order, each image's tiles together; None when there are none); `image_sizes`
    [I, 2] (the (width, height) each image was used at, when items bring them); `image_counts` [R]; `sample_ids` (one id
    per row, or a list of ids per row when packing); `sample_lengths` and `sample_images` (every sample's token
    and image count, for throughput accounting; their length is the number of samples).

    `pad_to_multiple_of`: rows are padded to a multiple of this many tokens, so a run meets few distinct batch
    shapes (on CPU, oneDNN builds and keeps a matmul kernel per shape, and one per length grows memory; on GPU,
    tensor cores want multiples of 8).
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int = 1,
        mask_free: bool = False,
        pack: bool = False,
        row_width: int | None = None,
        instruction_tokenizer=None,
        instruction_max_tokens: int = 128,
    ):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a real token id, got {pad_token_id}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if row_width is not None and row_width < 1:
            raise ValueError(f"row_width must be >= 1 (or None: the longest sample), got {row_width}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_free = mask_free
        self.instruction_tokenizer = instruction_tokenizer
        """When set (an instruction-aware Q-Former's tokenizer), batches also carry each image's instruction ids
        `qformer_input_ids` / `qformer_attention_mask` [I, L], in the order of the batch's images (items bring
        their `instruction` text)."""
        self.instruction_max_tokens = instruction_max_tokens
        self.pack = pack
        self.row_width = row_width

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """The samples (by index into `lengths`) that each row of the batch holds."""
        if not self.pack:
            return [[i] for i in range(len(lengths))]
        return pack_rows(lengths, max(max(lengths), self.row_width or 0))

    def is_mask_free(self, lengths: list[int], rows: list[list[int]] | None = None) -> bool:
        """Whether the batch of these sample lengths (laid out in `rows`, if known) goes out without mask and
        positions (see the module doc)."""
        return self.mask_free and all(len(r) == 1 for r in (rows or self.rows(lengths)))

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            return self._empty()
        lengths = [it["input_ids"].numel() for it in items]
        rows = self.rows(lengths)
        width = max(lengths) if not self.pack else max(max(lengths), self.row_width or 0)
        width = round_up(width, self.pad_to_multiple_of)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        image_key = "features" if "features" in items[0] else "pixel_values"
        n_images = [_num_images(it, image_key) for it in items]
        images, sizes, instructions, counts, row_ids, used = [], [], [], [], [], []
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                it, n = items[i], lengths[i]
                ids[r, start : start + n] = it["input_ids"]
                labels[r, start : start + n] = it["labels"]
                labels[r, start] = IGNORE_INDEX  # never a target: the token before it is another sample's
                positions[r, start : start + n] = torch.arange(n)
                start += n
                if n_images[i] > 0:
                    images.append(it[image_key])
                    if "image_sizes" in it:
                        sizes.append(it["image_sizes"])
                    instructions += [it.get("instruction", "")] * n_images[i]
            positions[r, start:] = torch.arange(
                width - start
            )  # the tail: its own segment, attends to nothing real
            counts.append(sum(n_images[i] for i in members))
            row_ids.append([items[i]["id"] for i in members] if self.pack else items[members[0]]["id"])
            used.append(start)
        shared = not self.is_mask_free(lengths, rows)
        mask = (torch.arange(width)[None, :] < torch.tensor(used)[:, None]).long()
        extra = self._instructions(instructions) if self.instruction_tokenizer is not None else {}
        return {
            **extra,
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask if shared and not self.pack else None,
            "position_ids": positions if shared and self.pack else None,
            image_key: torch.cat(images) if images else None,
            "image_sizes": torch.cat(sizes) if sizes else None,
            "image_counts": torch.tensor(counts, dtype=torch.long),
            "sample_ids": row_ids,
            "sample_lengths": lengths,
            "sample_images": n_images,
        }

    def _empty(self) -> dict[str, Any]:
        """Every sample of the micro-batch was skipped (bad data): no rows (see `BlankImageRow`)."""
        return {
            "input_ids": torch.zeros((0, 0), dtype=torch.long),
            "labels": torch.zeros((0, 0), dtype=torch.long),
            "attention_mask": None if self.mask_free else torch.zeros((0, 0), dtype=torch.long),
            "position_ids": None,
            "pixel_values": None,
            "image_sizes": None,
            "image_counts": torch.zeros(0, dtype=torch.long),
            "sample_ids": [],
            "sample_lengths": [],
            "sample_images": [],
        }

    def _instructions(self, texts: list[str]) -> dict[str, torch.Tensor | None]:
        """The Q-Former's ids of each image's instruction text (one text per image, in image order)."""
        if not texts:
            return {"qformer_input_ids": None, "qformer_attention_mask": None}
        ids, mask = encode_instructions(self.instruction_tokenizer, texts, self.instruction_max_tokens)
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}


def _num_images(item: dict[str, Any], image_key: str) -> int:
    """Images of a dataset item: its `image_sizes` rows (an image may have several tiles), else one per entry."""
    sizes = item.get("image_sizes")
    return int(sizes.shape[0]) if sizes is not None else int(item[image_key].shape[0])
