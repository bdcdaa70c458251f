"""`mllm export --format hf-llava-next`: an AnyRes model runs in transformers' LLaVA-NeXT with our logits and text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_checkpoint
from PIL import Image

PROMPT = "What shape is in the image?"
SIZES = [(96, 40), (40, 88), (64, 64), (150, 20)]
"""(width, height): wide, tall, square and very wide images pick different grids and unpad differently."""


def _config(backbones, mode="full", aspect="anyres", max_pixels=0, **connector):
    from mllm.config import ConnectorConfig, LLMConfig, LoraSettings, ModelConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(path=backbones["clip"], image_aspect=aspect, max_tiles=4, max_pixels=max_pixels),
        connector=ConnectorConfig(kind="mlp", **connector),
        llm=LLMConfig(path=backbones["llama"], mode=mode, lora=LoraSettings(r=8, alpha=16, dropout=0.0)),
        dtype="fp32",
    )


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_hf_llava_next_export_matches_our_model_on_images_of_several_shapes(backbones, tmp_path, mode):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mllm.cli import main
    from mllm.config import IMAGE_TOKEN_ID
    from mllm.inference import Conversation, SamplingConfig, generate_batch, load_pretrained

    ckpt = make_checkpoint(
        tmp_path / "ckpt", _config(backbones, mode), seed=3, system_prompt="Answer briefly."
    )
    out = tmp_path / "next"
    assert main(["export", ckpt, str(out), "--format", "hf-llava-next"]) == 0
    hf = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(out)
    model, processor = load_pretrained(ckpt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    grids = set()
    for seed, size in enumerate(SIZES):
        image = _image(seed, size)
        conv = Conversation.single(PROMPT, [image])
        batch = processor([conv])
        with torch.no_grad():
            ours = model(**{k: v for k, v in batch.items() if k != "sample_ids"}, return_logits=True).logits
        answer = generate_batch(model, processor, [conv], SamplingConfig(max_new_tokens=8))[0]
        inputs = hf_processor(images=image, text=text, return_tensors="pt")
        expected = batch["input_ids"].masked_fill(
            batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id
        )
        assert inputs["input_ids"].tolist() == expected.tolist(), f"{size}: the same prompt and image tokens"
        with torch.no_grad():
            theirs = hf(**inputs).logits
        vocab = ours.shape[-1]
        assert (theirs[..., :vocab] - ours).abs().max().item() <= 1e-4, size
        new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert hf_processor.tokenizer.decode(new, skip_special_tokens=True).strip() == answer, size
        grids.add(model.image_layout.num_tiles(size))
    assert len(grids) >= 2  # the shapes really took different grids


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"aspect": "square"}, "vision.image_aspect is 'square'"),
        ({"pixel_shuffle": 2}, "connector.pixel_shuffle is 2"),
        ({"max_pixels": 4096}, "min_pixels / max_pixels rescale images"),
        ({"projector": "linear"}, "connector mlp/linear"),
    ],
)
def test_hf_llava_next_refuses_what_llava_next_cannot_express(backbones, tmp_path, capsys, settings, reason):
    from mllm.cli import main

    ckpt = make_checkpoint(tmp_path / "ckpt", _config(backbones, "frozen", **settings))
    capsys.readouterr()
    assert main(["export", ckpt, str(tmp_path / "out"), "--format", "hf-llava-next"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and "Supported:" in err[0]
    assert not (tmp_path / "out").exists()
