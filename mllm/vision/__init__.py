"""Vision towers: pixel values → patch features [B, N, D]. One file per tower, one registry line each."""

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


def build_vision_tower(
    cfg: VisionConfig, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> VisionTower:
    if cfg.kind == "efficientnet-lite0" and cfg.kind not in VISION_TOWERS:
        from mllm.vision import efficientnet  # noqa: F401  (optional dependency, registers itself)
    return VISION_TOWERS.get(cfg.kind)(cfg, dtype=dtype, trust_remote_code=trust_remote_code)


__all__ = ["VISION_TOWERS", "VisionTower", "build_vision_tower"]
