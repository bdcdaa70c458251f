"""Flamingo / Idefics perceiver resampler: K latents attend over [vision features; latents]."""

from __future__ import annotations

import torch
from torch import nn

from mllm.config import ConnectorConfig
from mllm.connectors.base import Connector


class _ResamplerLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ffn = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), q], dim=1)  # [B, N+K, W]: latents also attend to themselves
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ffn(latents)


class PerceiverResampler(Connector):
    """Flamingo's resampler: features [I, N, Dv] → K = `num_queries` tokens [I, K, D_llm], whatever N is.

    K learned latents cross-attend to the projected features (and to themselves) in `num_layers` layers, so the
    LLM's sequence cost per image is fixed at K however many patches the tower emits.
    """

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int):
        super().__init__(cfg, vision_dim, vision_tokens, llm_dim)
        width = cfg.hidden_size or vision_dim
        if width % cfg.num_heads:
            raise ValueError(f"resampler width {width} is not divisible by num_heads {cfg.num_heads}")
        self.num_tokens = cfg.num_queries
        self.input_proj = nn.Linear(vision_dim, width)
        self.latents = nn.Parameter(torch.randn(cfg.num_queries, width) * 0.02)
        self.layers = nn.ModuleList(_ResamplerLayer(width, cfg.num_heads) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] → [B, K, Dl]
        media = self.input_proj(features)  # [B, N, W]
        latents = self.latents.to(media.dtype).unsqueeze(0).expand(features.shape[0], -1, -1)  # [B, K, W]
        for layer in self.layers:
            latents = layer(media, latents)
        return self.proj(self.norm(latents))
