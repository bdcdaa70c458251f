"""Vision towers: pixel values → patch features [B, N, D]. One file per tower, one registry line each.

A tower whose module needs an optional dependency registers lazily (`register_lazy("name", "module:Class")`):
its module is imported only when a config asks for it.
"""

from __future__ import annotations

import torch

from mllm.config import VisionConfig
from mllm.registry import Registry
from mllm.vision.base import VisionTower
from mllm.vision.blip2 import Blip2VisionTower
from mllm.vision.hf import HFVisionTower

VISION_TOWERS: Registry = Registry("vision tower")
VISION_TOWERS.register("hf")(HFVisionTower)
VISION_TOWERS.register("blip2")(Blip2VisionTower)
VISION_TOWERS.register_lazy("efficientnet-lite0", "mllm.vision.efficientnet:EfficientNetLite0Tower")


def build_vision_tower(
    cfg: VisionConfig, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> VisionTower:
    return VISION_TOWERS.get(cfg.kind)(cfg, dtype=dtype, trust_remote_code=trust_remote_code)


__all__ = ["VISION_TOWERS", "VisionTower", "build_vision_tower"]
