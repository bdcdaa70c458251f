"""The on-disk vision feature cache: cached == live, keyed by tower identity and image content, never crossed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mllm.config import VisionConfig
from mllm.data import build_dataset, load_recipe
from mllm.data.features import CachedFeatureDataset
from mllm.data.packing import PackingCollator
from mllm.model import build_model
from mllm.vision import build_vision_tower
from mllm.vision.cache import FeatureCache


def _images(folder, n=3, seed=0) -> list[str]:
    g = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i}.jpg")
        Image.fromarray(g.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _tower(path, **kw):
    return build_vision_tower(VisionConfig(path=path, **kw))


def _unusual_images(folder) -> list[str]:
    """Images a plain `convert("RGB")` decodes differently from training: EXIF-rotated, transparent, 16-bit."""
    g = np.random.default_rng(1)
    pixels = g.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° to display upright
    Image.fromarray(pixels).save(folder / "rotated.jpg", exif=exif)
    rgba = np.dstack([pixels, np.where(np.arange(40) < 20, 0, 255).astype(np.uint8)[None].repeat(24, 0)])
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    Image.fromarray(g.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "grey16.png")
    return [str(folder / n) for n in ("rotated.jpg", "transparent.png", "grey16.png")]


def test_cached_features_equal_live_features(backbones, tmp_path):
    """The reference is what training computes: the image opened by the data pipeline's own decoder."""
    from mllm.data.images import open_image

    tower = _tower(backbones["clip"])
    paths = _images(tmp_path / "img") + _unusual_images(tmp_path / "img")
    cache = FeatureCache(str(tmp_path / "cache"), tower)
    assert cache.fill(paths, batch_size=2, progress=False) == 6
    assert cache.fill(paths, progress=False) == 0  # everything already there
    for path in paths:
        image = open_image(os.path.basename(path), str(tmp_path / "img"), max_pixels=10**6)
        with torch.no_grad():
            live = tower(tower.preprocess([image]))[0]
        assert torch.allclose(cache.get(path), live, atol=1e-5), path
        assert cache.get(path).shape == (tower.num_tokens, tower.hidden_size)


def test_never_serves_another_towers_features(backbones, tmp_path):
    paths = _images(tmp_path / "img", n=1)
    root = str(tmp_path / "cache")
    clip = FeatureCache(root, _tower(backbones["clip"]))
    clip.fill(paths, progress=False)
    others = [
        FeatureCache(root, _tower(backbones["clip"], feature_layer=-1)),  # another layer
        FeatureCache(root, _tower(backbones["clip"], pool=2)),  # another selection
        FeatureCache(root, _tower(backbones["siglip"])),  # another tower
        FeatureCache(root, build_vision_tower(VisionConfig(path=backbones["clip"]), dtype=torch.bfloat16)),
    ]
    assert len({clip.dir, *(o.dir for o in others)}) == 5
    for other in others:
        assert paths[0] not in other
        with pytest.raises(KeyError, match="no cached features"):
            other.get(paths[0])
    # an entry copied into another tower's folder is refused, not served
    src = next(os.path.join(d, f) for d, _, fs in os.walk(clip.dir) for f in fs if f.endswith(".safetensors"))
    dst = others[0].path(os.path.basename(src)[: -len(".safetensors")])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(src, dst)
    with pytest.raises(ValueError, match="written by another tower"):
        others[0].get(paths[0])


def test_changed_weights_or_image_are_misses(backbones, tmp_path):
    vision = str(tmp_path / "vision")
    shutil.copytree(backbones["clip"], vision)
    paths = _images(tmp_path / "img", n=2)
    root = str(tmp_path / "cache")
    cache = FeatureCache(root, _tower(vision))
    cache.fill(paths, progress=False)
    # rewrite the weights (same size, possibly the same second): a new tower key, an empty folder
    model = _tower(vision).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(vision)
    retrained = FeatureCache(root, _tower(vision))
    assert retrained.dir != cache.dir and paths[0] not in retrained
    # an edited image is a miss even at the same path
    Image.new("RGB", (40, 40), (1, 2, 3)).save(paths[1])
    assert paths[0] in cache and paths[1] not in cache
    # a folder whose identity file disagrees with the tower is refused
    with open(os.path.join(retrained.dir, "tower.json"), "w") as f:
        json.dump({"kind": "something else"}, f)
    with pytest.raises(ValueError, match="belongs to another tower"):
        FeatureCache(root, retrained.tower)


def test_cached_dataset_gives_the_same_loss_as_pixels(backbones, tiny_config, tmp_path):
    paths = _images(tmp_path / "img", n=3)
    records = [
        {
            "id": f"s{i}",
            "image": os.path.basename(p),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": f"A picture number {i}."},
            ],
        }
        for i, p in enumerate(paths)
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    model = build_model(tiny_config("clip", "llama", "mlp"))
    tok = AutoTokenizer.from_pretrained(backbones["llama"])
    recipe = load_recipe(str(data), image_root=str(tmp_path / "img"))
    live = build_dataset(recipe, tok, model.num_image_tokens, model.vision.preprocess, progress=False)
    cached = CachedFeatureDataset(
        build_dataset(recipe, tok, model.num_image_tokens, None, progress=False),
        FeatureCache(str(tmp_path / "cache"), model.vision),
    )
    assert cached.fill(progress=False) == 3
    assert cached.lengths == live.lengths
    collate = PackingCollator(tok.pad_token_id, pack=False)
    a = collate([live[i] for i in range(3)])
    b = collate([cached[i] for i in range(3)])
    assert "pixel_values" not in b and b["features"].shape == (
        3,
        model.vision.num_tokens,
        model.vision.hidden_size,
    )
    common = ("input_ids", "attention_mask", "labels", "image_counts")
    with torch.no_grad():
        loss_live = model(**{k: a[k] for k in common}, pixel_values=a["pixel_values"]).loss
        loss_cached = model(**{k: b[k] for k in common}, features=b["features"]).loss
    assert torch.allclose(loss_live, loss_cached, atol=1e-5)


def test_the_fill_child_shows_its_progress_when_asked(backbones, tmp_path, capfd):
    """The fill before the first step can take minutes: its child process draws a bar on the run's stderr."""
    from mllm.vision.cache import fill_in_subprocess

    cfg = VisionConfig(path=backbones["clip"])
    paths = _images(tmp_path / "img")
    assert fill_in_subprocess(cfg, torch.float32, str(tmp_path / "c1"), paths, progress=True) == 3
    assert "caching vision features" in capfd.readouterr().err
    assert fill_in_subprocess(cfg, torch.float32, str(tmp_path / "c2"), paths) == 3
    assert "caching vision features" not in capfd.readouterr().err
