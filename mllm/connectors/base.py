"""The contract every connector keeps: vision features [I, N, Dv] → visual tokens [I, K, D_llm]."""

from __future__ import annotations

import torch
from torch import nn

from mllm.config import ConnectorConfig


class Connector(nn.Module):
    """Maps one image's vision-tower features to the K embeddings the LLM reads in place of its image placeholder.

    A connector is built as `Cls(cfg, vision_dim=Dv, vision_tokens=N, llm_dim=D_llm)` and must:
    - set `num_tokens` (K) in `__init__`: the data layer reserves K placeholder ids per image before any forward;
    - map `features` [I, N, Dv] (in its parameters' dtype) to [I, K, D_llm] in `forward`;
    - leave `instruction_aware` False unless `forward(features, text_ids [I, T], text_mask [I, T])` also reads
      each image's instruction (the InstructBLIP Q-Former).
    `tests/test_connectors.py` checks all of it for every registered connector.
    """

    num_tokens: int
    """K: visual tokens per image in the LLM sequence."""
    instruction_aware: bool = False
    """Whether `forward` also takes each image's instruction ids and mask [I, T]."""
    keeps_grid: bool = False
    """Whether its K tokens are the tile's patches in grid order (then `anyres` can lay tiles out, unpad them and
    end each row with `image_newline`; such a connector takes `image_newline=True` in `__init__`)."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int):
        super().__init__()

    def forward(self, features: torch.Tensor, *instruction: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward: [I, N, Dv] → [I, K, D_llm]")
