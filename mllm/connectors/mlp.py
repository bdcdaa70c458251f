"""LLaVA projector: `linear` or `mlpNx_gelu`, applied to every patch token.

Layers are named `linear_1 … linear_N` (the transformers LLaVA names), so a
2-layer projector exports to `LlavaForConditionalGeneration` unchanged.
With `pixel_shuffle` s > 1, each s×s block of patches is first merged into one
token of s² times the width (`mllm.connectors.pixel_shuffle`): s² fewer tokens.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mllm.config import ConnectorConfig
from mllm.connectors.base import Connector
from mllm.connectors.pixel_shuffle import pixel_shuffle, shuffled_grid


class MLPProjector(Connector):
    """LLaVA's projector: each of the N patch features [I, N, Dv] → one LLM embedding [I, N, D_llm] (K = N; with
    `pixel_shuffle` s, K = N / s² tokens of s²·Dv input width each).

    Keeps every patch (no compression unless pixel-shuffled), so the LLM sees the tower's full spatial detail;
    `linear` is LLaVA-1's, `mlp2x_gelu` LLaVA-1.5's (a GELU between layers lets stage 1 learn a non-linear map).
    `image_newline` (anyres): also holds LLaVA-NeXT's learned row separator [D_llm].
    """

    keeps_grid = True
    """Its tokens are the tile's patches in grid order (so `anyres` can lay tiles out and unpad them)."""

    def __init__(
        self,
        cfg: ConnectorConfig,
        vision_dim: int,
        vision_tokens: int,
        llm_dim: int,
        image_newline: bool = False,
    ):
        super().__init__(cfg, vision_dim, vision_tokens, llm_dim)
        depth = (
            1 if cfg.projector == "linear" else int(re.fullmatch(r"mlp(\d+)x_gelu", cfg.projector).group(1))
        )
        self.depth = depth
        self.shuffle = cfg.pixel_shuffle
        self.num_tokens = (
            shuffled_grid(vision_tokens, self.shuffle) ** 2 if self.shuffle > 1 else vision_tokens
        )
        self.linear_1 = nn.Linear(vision_dim * self.shuffle**2, llm_dim)
        self.act = nn.GELU()
        for i in range(2, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(llm_dim, llm_dim))
        if image_newline:  # LLaVA-NeXT's row separator for `anyres` (initialised normal, std 1/sqrt(D))
            self.image_newline = nn.Parameter(torch.randn(llm_dim) / llm_dim**0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] → [B, N/s², Dl]
        x = pixel_shuffle(features, self.shuffle)  # [B, N/s², s²·Dv]
        x = self.linear_1(x)  # [B, N/s², Dl]
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x
