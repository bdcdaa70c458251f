"""`PackingCollator`: several whole samples per row, positions restarting per sample, no attention across samples.

Rows are filled first-fit-decreasing up to a row width (default: the longest
sample of the micro-batch, so no row is longer than the padded batch would be
and attention never costs more). Each sample's position ids start at 0, and
the batch carries no `attention_mask`: transformers then finds the sample
boundaries from the position ids (`masking_utils.find_packed_sequence_indices`)
and builds a block-diagonal causal mask for SDPA (flash-attn varlen on GPU), so
a packed row computes exactly what the samples would compute one by one. The
first label of every sample is ignored, so no sample is trained to predict the
start of its neighbour. Images (`pixel_values` or cached `features`) are
concatenated in row-major token order, as `MultimodalLM.embed` splices them.

A micro-batch in which no two samples share a row (the usual case once the
sampler groups by length) goes out with neither mask nor position ids: its
padding only ever follows the real tokens, so causal attention alone is exact
for all of them, and SDPA (or flash-attn) then runs its causal kernel, which
skips the score blocks above the diagonal: half the attention work of any
masked kernel, which computes every block and masks it after.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm.data.collate import round_up
from mllm.data.encode import IGNORE_INDEX


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


class PackingCollator:
    """Dataset items (`input_ids`, `labels`, `pixel_values` or `features`, `id`) → a packed batch.

    The batch has `input_ids`, `labels`, `position_ids` [R, W] and `attention_mask=None` (or, with
    `pack=False`, one right-padded sample per row, `attention_mask` [R, W] and `position_ids=None`; or, when
    every row holds one sample and `mask_free` is on, right-padded rows with neither), `pixel_values` or
    `features` (images in row-major order), `image_counts` [R], `sample_ids` (per row), and `sample_lengths`
    and `sample_images` (every sample's token and image count, for throughput accounting).
    """

    def __init__(
        self,
        pad_token_id: int,
        row_width: int | None = None,
        pack: bool = True,
        mask_free: bool = True,
        pad_to_multiple_of: int = 1,
    ):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a real token id, got {pad_token_id}")
        if row_width is not None and row_width < 1:
            raise ValueError(f"row_width must be >= 1, got {row_width}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.row_width = row_width
        self.pack = pack
        """False: one sample per row, right-padded (the plain padded batch)."""
        self.pad_to_multiple_of = pad_to_multiple_of
        """Rows are padded to a multiple of this many tokens (packing still fills them only to the longest
        sample): few distinct batch shapes, so the CPU matmul library (oneDNN) builds and caches a kernel for
        a handful of shapes instead of one per length, which otherwise grows memory with every new length."""
        self.mask_free = mask_free
        """True: a batch whose rows each hold one sample carries no `attention_mask` / `position_ids` (causal
        kernels); False: it keeps its padding mask (`pack=False`) or per-row positions (`pack=True`)."""

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """The samples (by index into `lengths`) that each row of the batch holds."""
        width = max(max(lengths), self.row_width or 0)
        return pack_rows(lengths, width) if self.pack else [[i] for i in range(len(lengths))]

    def is_mask_free(self, lengths: list[int], rows: list[list[int]] | None = None) -> bool:
        """Whether the batch of these sample lengths (laid out in `rows`, if already known) goes out without mask
        and positions (see the module doc)."""
        return self.mask_free and all(len(r) == 1 for r in (rows or self.rows(lengths)))

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            raise ValueError("PackingCollator got an empty micro-batch (every sample was skipped)")
        lengths = [it["input_ids"].numel() for it in items]
        rows = self.rows(lengths)
        width = round_up(max(max(lengths), self.row_width or 0), self.pad_to_multiple_of)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        image_key = "features" if "features" in items[0] else "pixel_values"
        images, counts, row_ids = [], [], []
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                it, n = items[i], lengths[i]
                ids[r, start : start + n] = it["input_ids"]
                labels[r, start : start + n] = it["labels"]
                labels[r, start] = (
                    IGNORE_INDEX  # never a target: the token before it belongs to another sample
                )
                positions[r, start : start + n] = torch.arange(n)
                start += n
                if it[image_key].shape[0] > 0:
                    images.append(it[image_key])
            # the tail is its own segment (positions restart), so it attends to nothing real
            positions[r, start:] = torch.arange(width - start)
            counts.append(sum(items[i][image_key].shape[0] for i in members))
            row_ids.append([items[i]["id"] for i in members])
        used = torch.tensor([sum(lengths[i] for i in members) for members in rows])
        mask = None if self.pack else (torch.arange(width)[None, :] < used[:, None]).long()
        if self.is_mask_free(lengths, rows):
            mask, positions = None, None
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions if self.pack else None,
            "attention_mask": mask,
            image_key: torch.cat(images) if images else None,
            "image_counts": torch.tensor(counts, dtype=torch.long),
            "sample_ids": row_ids,
            "sample_lengths": lengths,
            "sample_images": [it[image_key].shape[0] for it in items],
        }


def causal_block_mask(
    position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact attention pattern of a batch as an explicit boolean mask [R, 1, W, W] (True = may attend).

    Packed rows (`position_ids`): causal inside each sample, nothing across samples (a sample starts where the
    position does not follow the previous one, as transformers detects it). Padded rows (`attention_mask`
    [R, W]): causal over the real tokens. transformers uses a 4D mask as given, so a compiled model sees a mask
    tensor on every batch, never `None` for a batch without padding (which would trigger a recompile).
    """
    if position_ids is not None:
        r, w = position_ids.shape
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        segment = starts.cumsum(1)  # [R, W]
        same = segment[:, :, None] == segment[:, None, :]
    elif attention_mask is not None:
        r, w = attention_mask.shape
        real = attention_mask.bool()
        same = real[:, None, :].expand(r, w, w)
    else:
        raise ValueError("causal_block_mask needs position_ids (packed rows) or attention_mask (padded rows)")
    causal = torch.ones(w, w, dtype=torch.bool).tril()
    return (same & causal)[:, None]
