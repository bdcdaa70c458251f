"""On-disk cache of frozen vision-tower features: image content → features [N, D], one folder per tower identity.

A frozen tower maps the same image to the same features in every epoch, every
stage and every run; computing them once saves the image decode, the
preprocessing and the tower's forward pass. The folder is named by a hash of
`VisionTower.identity()` (tower kind, weights fingerprint, resolution, feature
layer, dropped prefix, pooling) plus the compute dtype, so changing any of them
opens a different, empty folder: the cache never serves another tower's
features. Each entry is keyed by the SHA-256 of the image's encoded bytes (not
its path), so an edited image is a miss, and carries its tower key in its
metadata, which is checked on every read.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mllm.data.images import open_image
from mllm.data.sample import ImageRef
from mllm.vision import build_vision_tower
from mllm.vision.base import VisionTower


def tower_key(tower: VisionTower) -> dict[str, Any]:
    """Everything that determines the tower's features: its identity (which fingerprints its local weight files
    to the nanosecond, `mllm.vision.base.weights_fingerprint`), the dtype it computes in, the image decoding."""
    dtype = next(tower.parameters()).dtype
    return {**tower.identity(), "dtype": str(dtype).removeprefix("torch."), "decode": DECODE_VERSION}


def content_key(image: ImageRef) -> str:
    """SHA-256 of the image's encoded bytes (or of a decoded image's mode, size and pixels)."""
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, (bytes, bytearray)):
        h.update(image)
    else:
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


DECODE_VERSION = 2
"""Part of the tower key: 2 = decoded by the data pipeline's `open_image` (1 was a plain `convert("RGB")`, which
kept EXIF-rotated images sideways, clipped 16-bit ones and showed transparent areas as their stored colour)."""


def _open(image: ImageRef) -> Image.Image:
    """The image as training decodes it (`mllm.data.images.open_image`: upright, 8-bit RGB, transparency on white)."""
    if isinstance(image, str):
        return open_image(
            os.path.basename(image), os.path.dirname(os.path.abspath(image)), Image.MAX_IMAGE_PIXELS
        )
    return open_image(image, "", Image.MAX_IMAGE_PIXELS)


class FeatureCache:
    """Features of one tower under `root/<tower hash>/`. `get` reads; `fill` computes what is missing."""

    def __init__(self, root: str, tower: VisionTower):
        self.tower = tower
        self.key = tower_key(tower)
        self.tower_hash = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.root = root
        self.dir = os.path.join(root, self.tower_hash)
        os.makedirs(self.dir, exist_ok=True)
        ident = os.path.join(self.dir, "tower.json")
        if not os.path.exists(
            ident
        ):  # several ranks may get here at once: each writes whole, the last one stays
            tmp = f"{ident}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.key, f, indent=1, sort_keys=True)
            os.replace(tmp, ident)
        with open(ident, encoding="utf-8") as f:
            stored = json.load(f)
        if stored != json.loads(json.dumps(self.key)):
            raise ValueError(f"feature cache {self.dir} belongs to another tower: {stored} != {self.key}")

    def path(self, content: str) -> str:
        return os.path.join(self.dir, content[:2], content + ".safetensors")

    def __contains__(self, image: ImageRef) -> bool:
        return os.path.exists(self.path(content_key(image)))

    def get(self, image: ImageRef) -> torch.Tensor:
        """Cached features [N, D] of `image`; KeyError when it was never computed by this tower."""
        path = self.path(content_key(image))
        if not os.path.exists(path):
            raise KeyError(
                f"no cached features for this image under tower {self.tower_hash}; run fill() first"
            )
        return self._read(path)

    def _read(self, path: str) -> torch.Tensor:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("tower") != self.tower_hash:
                raise ValueError(f"{path}: written by another tower than {self.tower_hash}; delete the entry")
        return load_file(path)["features"]

    def put(self, content: str, features: torch.Tensor) -> None:
        path = self.path(content)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({"features": features.contiguous()}, tmp, metadata={"tower": self.tower_hash})
        os.replace(tmp, path)  # readers never see a half-written entry

    @torch.no_grad()
    def fill(self, images: Sequence[ImageRef], batch_size: int = 32, progress: bool = True) -> int:
        """Compute and store the features of every image not cached yet; returns how many were computed."""
        todo: dict[str, ImageRef] = {}
        for image in images:
            key = content_key(image)
            if key not in todo and not os.path.exists(self.path(key)):
                todo[key] = image
        keys = list(todo)
        was_training = self.tower.training
        self.tower.eval()
        try:
            bar = tqdm(total=len(keys), desc="caching vision features", unit="image", disable=not progress)
            for s in range(0, len(keys), batch_size):
                chunk = keys[s : s + batch_size]
                pixels = self.tower.preprocess([_open(todo[k]) for k in chunk])
                feats = self.tower(pixels)  # [b, N, D]
                for k, f in zip(chunk, feats, strict=True):
                    self.put(k, f.clone())
                bar.update(len(chunk))
            bar.close()
        finally:
            self.tower.train(was_training)
        return len(keys)


def fill_in_subprocess(
    vision_cfg,
    dtype: torch.dtype,
    root: str,
    images: Sequence[ImageRef],
    parent: FeatureCache | None = None,
    progress: bool = False,
) -> int:
    """`FeatureCache.fill` run by a fresh (spawned) process that loads its own copy of the tower (`progress`: the
    child shows a progress bar on this process's stderr).

    A training process that fills its cache itself keeps the fill's allocator high-water mark (tower
    activations, decoded images) for the rest of the run; a child returns all of it when it exits. Returns
    how many images were computed (0, without starting a process, when everything is cached). `parent`: this
    process's cache of the same tower, if it has one (else a copy of the tower is loaded to find what is missing).
    """
    parent = parent or FeatureCache(root, build_vision_tower(vision_cfg, dtype=dtype))
    missing = [im for im in images if im not in parent]
    if not missing:
        return 0
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        computed = pool.submit(_fill_child, vision_cfg, dtype, root, missing, progress).result()
    still = sum(im not in parent for im in missing)
    if still:
        raise RuntimeError(f"feature cache {parent.dir}: {still} image(s) still missing after the fill")
    return computed


def _fill_child(vision_cfg, dtype: torch.dtype, root: str, images: list, progress: bool) -> int:
    return FeatureCache(root, build_vision_tower(vision_cfg, dtype=dtype)).fill(images, progress=progress)
