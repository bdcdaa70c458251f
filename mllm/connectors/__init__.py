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


def build_connector(
    cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, llm_dim: int, image_newline: bool = False
) -> Connector:
    """The registered connector `cfg.kind` for features [I, N=vision_tokens, Dv=vision_dim] → [I, K, D=llm_dim];
    its `num_tokens` (K, per tower tile) is known before any forward (see `Connector`).

    `image_newline` (vision.image_aspect anyres): the connector also holds LLaVA-NeXT's learned `image_newline`
    [llm_dim]; only connectors that keep the tile's patch grid (`keeps_grid`: mlp) can have one.
    """
    cls = CONNECTORS.get(cfg.kind)
    if not image_newline:
        return cls(cfg, vision_dim, vision_tokens, llm_dim)
    if not cls.keeps_grid:
        raise ValueError(
            f"vision.image_aspect anyres lays each image's tiles out as a patch grid; the {cfg.kind!r} connector "
            "returns learned queries without a grid, so it cannot: use the mlp connector, or image_aspect pad"
        )
    return cls(cfg, vision_dim, vision_tokens, llm_dim, image_newline=True)


__all__ = ["CONNECTORS", "Connector", "build_connector"]
