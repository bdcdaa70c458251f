"""Connectors: vision features [I, N, Dv] → visual tokens [I, K, D_llm]. One file each, one registry line each.

A new connector subclasses `Connector` (its docstring states the contract) in its own file and adds one
`CONNECTORS.register` line here.
"""

from __future__ import annotations

from mllm.config import ConnectorConfig
from mllm.connectors.base import Connector
from mllm.connectors.mlp import MLPProjector
from mllm.connectors.qformer import QFormerConnector
from mllm.connectors.resampler import PerceiverResampler
from mllm.registry import Registry

CONNECTORS: Registry = Registry("connector")
CONNECTORS.register("mlp")(MLPProjector)
CONNECTORS.register("qformer")(QFormerConnector)
CONNECTORS.register("resampler")(PerceiverResampler)


def build_connector(cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int) -> Connector:
    """The registered connector `cfg.kind` for features [I, N=vision_tokens, Dv=vision_dim] → [I, K, D=llm_dim];
    its `num_tokens` (K) is known before any forward (see `Connector`)."""
    return CONNECTORS.get(cfg.kind)(cfg, vision_dim, vision_tokens, llm_dim)


__all__ = ["CONNECTORS", "Connector", "build_connector"]
