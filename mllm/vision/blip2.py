"""The vision half of a transformers BLIP-2 / InstructBLIP checkpoint as a `VisionTower` (kind `blip2`).

BLIP-2's Q-Former reads the EVA-ViT's *last* hidden state after its final layer norm, every token included (the
class token too), not a middle layer's patch tokens as LLaVA does; this tower hands the connector exactly that.
`path` is the BLIP-2 / InstructBLIP directory (or a saved `Blip2VisionModel` / `InstructBlipVisionModel`).
"""

from __future__ import annotations

from typing import Any

import torch

from mllm.config import VisionConfig
from mllm.vision.hf import HFVisionTower

BLIP2_VISION_CLASSES = ("Blip2VisionModel", "InstructBlipVisionModel")


class Blip2VisionTower(HFVisionTower):
    def __init__(
        self, cfg: VisionConfig, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
    ):
        if cfg.pool != 1:
            raise ValueError(
                f"vision kind blip2 feeds every token to the Q-Former: pool must be 1, got {cfg.pool}"
            )
        super().__init__(cfg, dtype, trust_remote_code)
        if type(self.model).__name__ not in BLIP2_VISION_CLASSES:
            raise ValueError(
                f"{cfg.path}: a {type(self.model).__name__}; vision kind blip2 takes a BLIP-2 or InstructBLIP "
                f"checkpoint ({', '.join(BLIP2_VISION_CLASSES)})"
            )
        self.num_tokens = self._patches + self.num_prefix  # the class token stays
        self.num_prefix = 0  # nothing is dropped

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] → [B, 1 + patches, D]
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # post-layernorm, as BLIP-2

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "kind": "blip2", "feature_layer": "last_hidden_state"}
