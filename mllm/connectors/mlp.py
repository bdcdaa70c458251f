"""LLaVA projector: `linear` or `mlpNx_gelu`, applied to every patch token.

Layers are named `linear_1 … linear_N` (the transformers LLaVA names), so a
2-layer projector exports to `LlavaForConditionalGeneration` unchanged.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mllm.config import ConnectorConfig
from mllm.connectors.base import Connector


class MLPProjector(Connector):
    """LLaVA's projector: each of the N patch features [I, N, Dv] → one LLM embedding [I, N, D_llm] (K = N).

    Keeps every patch (no compression), so the LLM sees the tower's full spatial detail at N tokens per image;
    `linear` is LLaVA-1's, `mlp2x_gelu` LLaVA-1.5's (a GELU between layers lets stage 1 learn a non-linear map).
    """

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int):
        super().__init__(cfg, vision_dim, vision_tokens, llm_dim)
        depth = (
            1 if cfg.projector == "linear" else int(re.fullmatch(r"mlp(\d+)x_gelu", cfg.projector).group(1))
        )
        self.depth = depth
        self.num_tokens = vision_tokens
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        for i in range(2, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(llm_dim, llm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] → [B, N, Dl]
        x = self.linear_1(features)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x
