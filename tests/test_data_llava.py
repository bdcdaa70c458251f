"""LLaVA JSON / JSONL sources in the published schemas → dataset items, exact lengths, collated batches."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import IGNORE_INDEX, Collator, build_dataset, load_recipe
from mllm.testing.tokenizers import make_tokenizer

HERE = os.path.join(os.path.dirname(__file__), "data")
PRETRAIN = os.path.join(HERE, "llava_pretrain_558k_sample.json")
MIX665K = os.path.join(HERE, "llava_v1_5_mix665k_sample.json")
K = 4  # image tokens per image


@functools.lru_cache
def tokenizer(family: str = "llama"):
    return make_tokenizer(family)


def preprocess(images: list[Image.Image]) -> torch.Tensor:
    """A stand-in for a vision tower's preprocess: resize to 16x16, scale to [0, 1]."""
    arrays = [np.asarray(im.resize((16, 16)), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def write_images(data_file: str, root: str) -> None:
    with open(data_file) as f:
        records = json.load(f)
    for r in records:
        if "image" in r:
            path = os.path.join(root, r["image"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.new("RGB", (20, 12), (200, 30, 30)).save(path)


def test_llava_pretrain_schema_with_plain_template(tmp_path):
    write_images(PRETRAIN, str(tmp_path))
    recipe = load_recipe(PRETRAIN, image_root=str(tmp_path), template="plain")
    tok = tokenizer()
    ds = build_dataset(recipe, tok, image_tokens=K, preprocess=preprocess, progress=False)
    assert len(ds) == 3 and ds.has_image == [True, True, True]
    item = ds[1]
    caption = tok("a grey watch with an army style strap", add_special_tokens=False)["input_ids"]
    assert item["input_ids"].tolist() == [tok.bos_token_id] + [IMAGE_TOKEN_ID] * K + caption + [
        tok.eos_token_id
    ]
    assert item["labels"].tolist() == [IGNORE_INDEX] * (1 + K) + caption + [tok.eos_token_id]
    assert item["pixel_values"].shape == (1, 3, 16, 16)
    assert (item["id"], item["source"], item["index"]) == ("002239345", "llava_pretrain_558k_sample.json", 1)
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(len(ds))]


def test_llava_mix665k_schema_with_chat_template(tmp_path):
    write_images(MIX665K, str(tmp_path))
    recipe = load_recipe(MIX665K, image_root=str(tmp_path))
    tok = tokenizer("qwen2")
    ds = build_dataset(recipe, tok, image_tokens=K, preprocess=preprocess, progress=False)
    assert len(ds) == 4
    assert ds.has_image == [True, False, True, True]  # the ShareGPT text-only sample loads as published
    text_only = ds[1]
    assert text_only["pixel_values"].shape[0] == 0 and IMAGE_TOKEN_ID not in text_only["input_ids"].tolist()
    item = ds[2]
    sup = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert tok.decode(sup) == "Sandra Boynton<|im_end|>Moo, Baa, La La La!<|im_end|>"
    assert (item["input_ids"] == IMAGE_TOKEN_ID).sum() == K
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(len(ds))]

    batch = Collator(tok.pad_token_id)([ds[0], None, ds[1], ds[2]])
    assert batch["sample_ids"] == ["000000033471", "i6IyJda_0", "71kQGGI5fiL"]
    assert batch["image_counts"].tolist() == [1, 0, 1]
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    width = max(ds.lengths[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for b, i in enumerate([0, 1, 2]):
        n = ds.lengths[i]
        assert batch["attention_mask"][b].sum() == n
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()

    rounded = Collator(tok.pad_token_id, pad_to_multiple_of=16, mask_free=True)([ds[0], None, ds[1], ds[2]])
    assert rounded["attention_mask"] is None
    assert rounded["input_ids"].shape[1] == -(-width // 16) * 16 >= width
    assert torch.equal(rounded["input_ids"][:, :width], batch["input_ids"])
    assert torch.equal(rounded["labels"][:, :width], batch["labels"])
    assert (rounded["labels"][:, width:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        Collator(tok.pad_token_id, pad_to_multiple_of=0)


def test_jsonl_recipe_with_system_prompt_and_sampling(tmp_path):
    with open(MIX665K) as f:
        records = json.load(f)
    data = tmp_path / "mix.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    write_images(MIX665K, str(tmp_path / "img"))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "name: t\nimage_root: img\ntemplate: chatml\nmax_length: 512\nsystem_prompt: Be brief.\n"
        "sources:\n  - path: mix.jsonl\n    sample: random:2\n  - path: mix.jsonl\n    name: again\n    sample: 50%\n"
    )
    recipe = load_recipe(str(recipe_file))
    assert recipe.image_root == str(tmp_path / "img")
    tok = tokenizer("qwen2")
    ds = build_dataset(recipe, tok, image_tokens=K, preprocess=None, progress=False)
    assert len(ds) == 4 and ds.source_names == ["mix.jsonl", "again"]
    assert [it.index for it in ds.items[2:]] == [0, 1]
    text = tok.decode([i for i in ds[0]["input_ids"].tolist() if i >= 0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
