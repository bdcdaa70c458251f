"""Any transformers vision encoder (CLIP, SigLIP, DINOv2, ViT, …) as a `VisionTower`."""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from mllm.config import VisionConfig
from mllm.vision.base import VisionTower, pool_grid, pooled_count, weights_fingerprint

# Composite checkpoints (vision + text) whose vision half we load alone.
_VISION_ONLY_CLASS = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "blip-2": "Blip2VisionModel",
    "instructblip": "InstructBlipVisionModel",
}
# Where the vision half's weights sit in the composite, for classes that hold them at their top level.
_VISION_KEY_MAPPING = {"blip-2": {r"^vision_model\.": ""}, "instructblip": {r"^vision_model\.": ""}}


def _load_vision_model(path: str, dtype: torch.dtype, trust_remote_code: bool):
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(config, "vision_config", None) is not None:
        name = _VISION_ONLY_CLASS.get(config.model_type)
        if name is None:
            raise ValueError(
                f"{path}: a composite '{config.model_type}' model; mllm knows how to take the vision half of "
                f"{sorted(_VISION_ONLY_CLASS)} only. Save its vision model alone and pass that directory."
            )

        return getattr(transformers, name).from_pretrained(
            path, dtype=dtype, key_mapping=_VISION_KEY_MAPPING.get(config.model_type)
        )
    return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def _prefix_tokens(model) -> int:
    """Tokens before the patch grid: a CLS token (CLIP, ViT, DINOv2) and register tokens, if any.

    Asked of the tower's embeddings, never assumed: SigLIP has neither.
    """
    emb = getattr(model, "embeddings", None) or getattr(
        getattr(model, "vision_model", None), "embeddings", None
    )
    if emb is None:
        raise ValueError(f"cannot find the embeddings of {type(model).__name__} to count its prefix tokens")
    count = int(hasattr(emb, "class_embedding") or getattr(emb, "cls_token", None) is not None)
    registers = getattr(emb, "register_tokens", None)
    if registers is not None:
        count += registers.shape[1]
    return count


def _square_side(processor) -> int:
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if isinstance(size, dict):
            for key in ("height", "shortest_edge"):
                if key in size:
                    return int(size[key])
        elif isinstance(size, int):
            return size
    raise ValueError(f"cannot read the input resolution of {type(processor).__name__}")


class HFVisionTower(VisionTower):
    def __init__(
        self, cfg: VisionConfig, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
    ):
        super().__init__()
        self.cfg = cfg
        self.model = _load_vision_model(cfg.path, dtype, trust_remote_code)
        self.processor = AutoImageProcessor.from_pretrained(cfg.path)
        mcfg = self.model.config
        self.hidden_size = mcfg.hidden_size
        self.image_size = int(mcfg.image_size)
        patches = (self.image_size // mcfg.patch_size) ** 2
        self.num_prefix = _prefix_tokens(self.model)
        self.num_tokens = pooled_count(patches, cfg.pool)
        self._patches = patches

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
            "pixel_values"
        ]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.cfg.feature_layer][:, self.num_prefix :]
        if feats.shape[1] != self._patches:
            raise ValueError(
                f"vision tower returned {feats.shape[1]} patch tokens, expected {self._patches} "
                f"({self.image_size}px / patch {self.model.config.patch_size}); check the image processor size"
            )
        return pool_grid(feats, self.cfg.pool)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "path": os.path.abspath(self.cfg.path) if os.path.exists(self.cfg.path) else self.cfg.path,
            "weights": weights_fingerprint(self.cfg.path),
            "resolution": self.image_size,
            "feature_layer": self.cfg.feature_layer,
            "prefix_dropped": self.num_prefix,
            "pool": self.cfg.pool,
        }
