"""The narrow interface every vision tower implements: images → patch features [B, N, D]."""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torch import nn

from mllm.fingerprint import file_fingerprint


class VisionTower(nn.Module):
    """Owns its preprocessing; knows its output token count before any forward pass."""

    hidden_size: int
    """Width D of each output token."""
    num_tokens: int
    """Tokens N per image (after prefix dropping and pooling)."""
    image_size: int
    """Side of the square input the tower expects."""

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images → pixel values [B, 3, H, W] (float32)."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values [B, 3, H, W] → features [B, N, D]."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What determines the features (for caches): tower, weights (`weights_fingerprint`), resolution, layer,
        selection."""
        raise NotImplementedError


def pool_grid(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool square-grid tokens [B, S*S, D] by `factor` per side → [B, (S/f)^2, D]."""
    if factor == 1:
        return features
    b, n, d = features.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot pool {n} tokens: not a square grid")
    grid = features.transpose(1, 2).reshape(b, d, side, side)
    grid = nn.functional.avg_pool2d(grid, kernel_size=factor, stride=factor, ceil_mode=True)
    return grid.flatten(2).transpose(1, 2)


def pooled_count(num_tokens: int, factor: int) -> int:
    side = int(round(num_tokens**0.5))
    out = -(-side // factor)
    return out * out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")
"""Files of a local tower folder that decide its features: weights and configs."""


def weights_fingerprint(path: str) -> str:
    """Identity of a tower's local weights (file or folder: names, sizes, nanosecond mtimes of its weight and
    config files); a hub id or other non-local `path` is its own identity."""
    if not os.path.exists(path):
        return path
    return file_fingerprint(path, content=False, mtime=True, suffixes=WEIGHT_SUFFIXES)
