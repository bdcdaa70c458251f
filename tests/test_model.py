"""MultimodalLM: every connector × LM family × vision tower, splicing, trainability, error messages."""

from __future__ import annotations

import itertools

import pytest
import torch

from mllm.config import IMAGE_TOKEN_ID
from mllm.connectors import CONNECTORS
from mllm.model import build_model, parameter_table
from mllm.testing import LLM_FAMILIES, VISION_FAMILIES


def _sample(model, n_images: int, prefix=(5, 6), suffix=(7, 8, 9)):
    k = model.num_image_tokens
    ids = list(prefix) + [IMAGE_TOKEN_ID] * (k * n_images) + list(suffix)
    labels = [-100] * (len(ids) - len(suffix)) + list(suffix)
    return ids, labels


def _batch(model, image_counts: list[int]):
    rows = [_sample(model, n) for n in image_counts]
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        ids[i, : len(r_ids)] = torch.tensor(r_ids)
        labels[i, : len(r_labels)] = torch.tensor(r_labels)
        mask[i, : len(r_ids)] = 1
    size = model.vision.image_size
    pixels = torch.randn(sum(image_counts), 3, size, size)
    return dict(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        pixel_values=pixels,
        image_counts=torch.tensor(image_counts),
    )


@pytest.mark.parametrize(
    "connector,vision,llm", list(itertools.product(CONNECTORS.names(), VISION_FAMILIES, LLM_FAMILIES))
)
def test_forward_backward_every_combination(tiny_config, connector, vision, llm):
    model = build_model(tiny_config(vision, llm, connector))
    out = model(**_batch(model, [1, 2]))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grads = [p.grad for p in model.connector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_stage1_trains_only_the_connector(tiny_config):
    model = build_model(tiny_config("clip", "qwen2", "mlp"))
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("connector.")
    }
    conn_before = {n: p.detach().clone() for n, p in model.connector.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_batch(model, [1, 1])).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("connector."), name
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{n} changed"
    assert any(not torch.equal(p, conn_before[n]) for n, p in model.connector.named_parameters())


def test_visual_tokens_land_exactly_at_placeholders(tiny_config):
    model = build_model(tiny_config("siglip", "llama", "mlp"))
    batch = _batch(model, [2, 0])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_counts"])
    visual = model.encode_images(batch["pixel_values"])  # [2, K, D]
    k = model.num_image_tokens
    assert torch.equal(embeds[0, 2 : 2 + k], visual[0]) and torch.equal(
        embeds[0, 2 + k : 2 + 2 * k], visual[1]
    )
    text_positions = batch["input_ids"] != IMAGE_TOKEN_ID
    table = model.llm.get_input_embeddings().weight
    assert torch.equal(embeds[text_positions], table[batch["input_ids"][text_positions]])
    # the text-only row is untouched by images and gets a finite loss in the same batch
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_placeholder_image_mismatch_names_the_sample(tiny_config):
    model = build_model(tiny_config("clip", "gpt2", "resampler"))
    batch = _batch(model, [2, 1])
    batch["image_counts"] = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"sample llava-42: .*image-token positions but its 1 image"):
        model(**batch, sample_ids=["llava-42", "llava-43"])
    batch = _batch(model, [1])
    batch["pixel_values"] = batch["pixel_values"][:0]
    batch.pop("image_counts")
    with pytest.raises(ValueError, match="its 0 image"):
        model(**batch)


def test_cls_token_is_dropped_only_when_the_tower_has_one(tiny_config):
    clip = build_model(tiny_config("clip", "llama", "mlp"))
    siglip = build_model(tiny_config("siglip", "llama", "mlp"))
    assert clip.vision.num_prefix == 1 and siglip.vision.num_prefix == 0
    assert clip.num_image_tokens == siglip.num_image_tokens == (32 // 8) ** 2
    pixels = torch.randn(1, 3, 32, 32)
    assert clip.vision(pixels).shape == (1, 16, 48) and siglip.vision(pixels).shape == (1, 16, 48)


def test_vision_pooling_reduces_tokens(tiny_config):
    cfg = tiny_config("siglip", "llama", "mlp")
    cfg.vision.pool = 2
    model = build_model(cfg)
    assert model.num_image_tokens == 4
    assert model.vision(torch.randn(2, 3, 32, 32)).shape == (2, 4, 48)


def test_lora_mode_trains_only_adapters_and_connector(tiny_config):
    model = build_model(tiny_config("clip", "llama", "mlp", mode="lora"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connector.") or "lora_" in n for n in trainable)
    rows = {name: (t, n) for name, t, n in parameter_table(model)}
    assert rows["vision"][0] == 0 and 0 < rows["llm"][0] < rows["llm"][1]


def test_full_mode_trains_llm(tiny_config):
    model = build_model(tiny_config("clip", "phi3", "qformer", mode="full"))
    rows = {name: (t, n) for name, t, n in parameter_table(model)}
    assert rows["llm"][0] == rows["llm"][1] and rows["vision"][0] == 0


def test_qlora_loads_a_4bit_base_and_trains_adapters(tiny_config):
    cfg = tiny_config("clip", "llama", "mlp", mode="qlora")
    cfg.dtype = "bf16"
    model = build_model(cfg)
    linear_types = {type(m).__name__ for m in model.llm.modules()}
    assert "Linear4bit" in linear_types
    out = model(**_batch(model, [1]))
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("connector.") or "lora_" in n for n in trainable)
    assert all(
        p.grad is not None
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith("connector.")
    )
