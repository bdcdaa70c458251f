"""Connectors: vision features [B, N, Dv] → visual tokens [B, K, D_llm]. One file each, one registry line each."""

from __future__ import annotations

from torch import nn

from mllm.config import ConnectorConfig
from mllm.connectors.mlp import MLPProjector
from mllm.connectors.qformer import QFormerConnector
from mllm.connectors.resampler import PerceiverResampler
from mllm.registry import Registry

CONNECTORS: Registry = Registry("connector")
CONNECTORS.register("mlp")(MLPProjector)
CONNECTORS.register("qformer")(QFormerConnector)
CONNECTORS.register("resampler")(PerceiverResampler)


def build_connector(cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int) -> nn.Module:
    """The built module exposes `num_tokens`: visual tokens per image, known before any forward."""
    return CONNECTORS.get(cfg.kind)(cfg, vision_dim, vision_tokens, llm_dim)


__all__ = ["CONNECTORS", "build_connector"]
