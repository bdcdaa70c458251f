"""Sequence packing: the packing preset of the one `Collator`, and a packed batch's exact mask spelled out.

How rows are packed (whole samples, first-fit-decreasing, positions restarting
per sample, no attention across samples) is written down in `mllm.data.collate`,
where the one collator lives; `pack_rows` is its row layout.
"""

from __future__ import annotations

import functools

import torch

from mllm.data.collate import Collator

PackingCollator = functools.partial(Collator, pack=True, mask_free=True)
"""The packing `Collator` (packing and mask-free batches on): one collator, this is only its packing preset."""


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
