"""Checkpoint files: complete-marker verification, fallback past a damaged newest one, clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import make_checkpoint, make_image

import mllm
from mllm.checkpoint import CheckpointError, latest_checkpoint, load_model_and_config, verify
from mllm.config import IMAGE_TOKEN_ID


def _logits(model, ids=(5, 6, 7)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)]), return_logits=True).logits


def test_round_trip_and_top_level_api(tmp_path, tiny_config):
    saved = []  # the model as it was saved (make_checkpoint hands it to `edit` just before saving)
    cfg = tiny_config("clip", "qwen2", "qformer", mode="lora")
    ckpt = make_checkpoint(tmp_path / "checkpoint-3", cfg, edit=saved.append)
    original = saved[0].eval()
    model, config = load_model_and_config(tmp_path)  # an output directory → its newest complete checkpoint
    assert config["_path"].endswith("checkpoint-3") and model.config.connector.kind == "qformer"
    trained = {n: p for n, p in original.named_parameters() if p.requires_grad}  # connector + LoRA
    loaded = dict(model.named_parameters())
    assert trained and all(torch.equal(p, loaded[n]) for n, p in trained.items())
    pixels = original.vision.preprocess([make_image(0)])
    with torch.no_grad():
        assert torch.equal(_logits(model), _logits(original))
        image_ids = torch.tensor([[5, *[IMAGE_TOKEN_ID] * original.num_image_tokens, 6, 7]])
        counts = torch.tensor([1])
        expected = original(image_ids, pixel_values=pixels, image_counts=counts, return_logits=True).logits
        got = model(image_ids, pixel_values=pixels, image_counts=counts, return_logits=True).logits
        assert torch.equal(got, expected)  # the connector's output reaches the LLM unchanged
    again, processor = mllm.load_checkpoint(ckpt)
    assert torch.equal(_logits(again), _logits(original))
    assert processor.image_tokens == model.num_image_tokens


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, tiny_config, caplog):
    cfg = tiny_config("siglip", "llama", "mlp")
    make_checkpoint(tmp_path / "checkpoint-1", cfg, seed=1)
    make_checkpoint(tmp_path / "checkpoint-2", cfg, seed=2)
    (tmp_path / "checkpoint-2" / "connector.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="wrong size"):
        verify(tmp_path / "checkpoint-2")
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert "skipping damaged checkpoint" in caplog.text
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-5")
    (tmp_path / "checkpoint-5" / "COMPLETE").unlink()  # an interrupted save
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"


def test_unknown_connector_and_format_version_are_refused(tmp_path, tiny_config):
    ckpt = tmp_path / "c"
    make_checkpoint(ckpt, tiny_config())
    config = json.loads((ckpt / "mllm_config.json").read_text())
    config["format_version"] = 99
    (ckpt / "mllm_config.json").write_text(json.dumps(config))
    (ckpt / "COMPLETE").unlink()
    from mllm.checkpoint import mark_complete

    mark_complete(ckpt)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model_and_config(ckpt)
    config["format_version"] = 1
    config["model"]["connector"]["kind"] = "perceiver-xl"
    (ckpt / "mllm_config.json").write_text(json.dumps(config))
    mark_complete(ckpt)
    with pytest.raises(CheckpointError, match="unknown connector 'perceiver-xl'"):
        load_model_and_config(ckpt)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model_and_config(tmp_path / "missing")


def test_load_4bit_quantises_a_frozen_llm(tmp_path, tiny_config):
    ckpt = make_checkpoint(tmp_path / "c", tiny_config("clip", "llama", "mlp"))
    model, _ = load_model_and_config(ckpt, dtype="bf16", load_4bit=True)
    assert any(type(m).__name__ == "Linear4bit" for m in model.llm.modules())
    assert torch.isfinite(_logits(model)).all()
