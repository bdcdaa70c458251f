"""BLIP-2 Querying Transformer: K learned queries cross-attend to the vision features.

Built on transformers' `Blip2QFormerModel`; a linear layer maps the K query
outputs to the LLM width, giving K visual tokens per image.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mllm.config import ConnectorConfig


class QFormerConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int):
        super().__init__()
        width = cfg.hidden_size or vision_dim
        if width % cfg.num_heads:
            raise ValueError(f"qformer width {width} is not divisible by num_heads {cfg.num_heads}")
        qcfg = Blip2QFormerConfig(
            hidden_size=width,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=4 * width,
            encoder_hidden_size=vision_dim,
            cross_attention_frequency=1,
            vocab_size=1,  # the Q-Former here never embeds text
        )
        self.num_tokens = cfg.num_queries
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, width) * 0.02)
        self.qformer = Blip2QFormerModel(qcfg)
        self.proj = nn.Linear(width, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] → [B, K, Dl]
        queries = self.query_tokens.expand(features.shape[0], -1, -1).to(features.dtype)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=features
        ).last_hidden_state  # [B, K, W]
        return self.proj(out)
