"""`mllm export`: the hf-llava directory runs in transformers with our logits; merged LoRA = adapter checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_checkpoint, make_image

PROMPT = "What shape is in the image?"


def _config(backbones, vision="clip", mode="full", **connector):
    from mllm.config import ConnectorConfig, LLMConfig, LoraSettings, ModelConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(path=backbones[vision], pool=connector.pop("pool", 1)),
        connector=ConnectorConfig(**{"kind": "mlp", "num_queries": 4, "num_heads": 4, **connector}),
        llm=LLMConfig(path=backbones["llama"], mode=mode, lora=LoraSettings(r=8, alpha=16, dropout=0.0)),
        dtype="fp32",
    )


def _ours(model, processor, image, max_new_tokens=8):
    from mllm.inference import Conversation, SamplingConfig, generate_batch

    conv = Conversation.single(PROMPT, [image])
    batch = processor([conv])
    with torch.no_grad():
        logits = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_counts")},
            return_logits=True,
        ).logits
    answer = generate_batch(model, processor, [conv], SamplingConfig(max_new_tokens=max_new_tokens))[0]
    return batch, logits, answer


@pytest.mark.slow
@pytest.mark.parametrize(
    "vision,mode", [("clip", "full"), ("siglip", "full"), ("clip", "lora"), ("clip", "qlora")]
)
def test_hf_llava_export_matches_our_model(backbones, tmp_path, vision, mode):
    """LoRA adapters are merged into the export; QLoRA ones into the full-precision base (a real QLoRA checkpoint:
    trained on an NF4 base, bitsandbytes on this CPU). The reference is our model as `mllm chat` would run it, for
    QLoRA with the full-precision base the export holds: the NF4 base itself is not what LLaVA gets."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm.cli import main
    from mllm.config import IMAGE_TOKEN_ID
    from mllm.inference import load_pretrained

    ckpt = make_checkpoint(
        tmp_path / "ckpt", _config(backbones, vision, mode=mode), seed=3, system_prompt="Answer briefly."
    )
    out = tmp_path / "llava"
    assert main(["export", ckpt, str(out), "--format", "hf-llava"]) == 0

    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(out)
    image = make_image(7)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_processor(images=image, text=text, return_tensors="pt")

    model, processor = load_pretrained(ckpt, full_precision_base=True)
    batch, ours, answer = _ours(model, processor, image)
    if mode in ("lora", "qlora"):  # the adapters matter: an export without them would be told apart
        with model.llm.disable_adapter():
            _, base, _ = _ours(model, processor, image)
        assert (ours - base).abs().max().item() > 1e-2
    expected_ids = batch["input_ids"].masked_fill(
        batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id
    )
    assert inputs["input_ids"].tolist() == expected_ids.tolist(), (
        "the exported processor builds the same prompt"
    )
    with torch.no_grad():
        theirs = hf(**inputs).logits
    vocab = ours.shape[-1]
    assert (theirs[..., :vocab] - ours).abs().max().item() <= 1e-4
    new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert hf_processor.tokenizer.decode(new, skip_special_tokens=True).strip() == answer
    strategy = {"clip": "default", "siglip": "full"}[vision]
    assert json.loads((out / "config.json").read_text())["vision_feature_select_strategy"] == strategy


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"kind": "qformer"}, "connector qformer"),
        ({"projector": "linear"}, "connector mlp/linear"),
        ({"pool": 2}, "vision.pool is 2"),
        ({"pixel_shuffle": 2}, "connector.pixel_shuffle is 2"),
    ],
)
def test_hf_llava_refuses_what_llava_cannot_express(backbones, tmp_path, capsys, settings, reason):
    from mllm.cli import main

    ckpt = make_checkpoint(tmp_path / "ckpt", _config(backbones, mode="frozen", **settings))
    capsys.readouterr()
    assert main(["export", ckpt, str(tmp_path / "out"), "--format", "hf-llava"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and "Supported:" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merged_lora_export_gives_the_adapter_checkpoints_outputs(backbones, tmp_path):
    from mllm.checkpoint import read_config
    from mllm.cli import main
    from mllm.inference import load_pretrained

    ckpt = make_checkpoint(tmp_path / "lora", _config(backbones, mode="lora"), seed=4, template="chatml")
    out = tmp_path / "merged"
    assert main(["export", ckpt, str(out), "--merge-lora"]) == 0
    config = read_config(out)
    assert config["model"]["llm"]["mode"] == "full" and config["template"] == "chatml"
    assert (out / "llm.safetensors").is_file() and not (out / "adapter").exists()

    image = make_image(8)
    adapter_model, adapter_proc = load_pretrained(ckpt)
    base_logits = None
    _, lora_logits, lora_answer = _ours(adapter_model, adapter_proc, image)
    with adapter_model.llm.disable_adapter():
        _, base_logits, _ = _ours(adapter_model, adapter_proc, image)
    assert (lora_logits - base_logits).abs().max() > 1e-3, "the adapters change the outputs"
    merged_model, merged_proc = load_pretrained(out)
    _, merged_logits, merged_answer = _ours(merged_model, merged_proc, image)
    assert (merged_logits - lora_logits).abs().max().item() <= 1e-4
    assert merged_answer == lora_answer


def test_qlora_adapters_merge_into_the_full_precision_base(backbones, tmp_path):
    from mllm.checkpoint import CONFIG_FILE, mark_complete, read_config
    from mllm.cli import main
    from mllm.inference import load_pretrained

    ckpt = make_checkpoint(tmp_path / "qlora", _config(backbones, mode="lora"), seed=5)
    saved = json.loads((tmp_path / "qlora" / CONFIG_FILE).read_text())
    saved["model"]["llm"]["mode"] = "qlora"  # QLoRA adapters have the LoRA layout; only the base was 4-bit
    (tmp_path / "qlora" / CONFIG_FILE).write_text(json.dumps(saved))
    mark_complete(ckpt)
    out = tmp_path / "merged"
    assert main(["export", ckpt, str(out), "--merge-lora"]) == 0
    assert read_config(out)["model"]["llm"]["mode"] == "full"
    image = make_image(9)
    _, adapter_logits, _ = _ours(*load_pretrained(ckpt, full_precision_base=True), image)
    _, merged_logits, _ = _ours(*load_pretrained(out), image)
    assert (merged_logits - adapter_logits).abs().max().item() <= 1e-4


def test_merge_lora_refuses_a_checkpoint_without_adapters(backbones, tmp_path, capsys):
    from mllm.cli import main

    ckpt = make_checkpoint(tmp_path / "full", _config(backbones, mode="frozen"))
    assert main(["export", ckpt, str(tmp_path / "out"), "--merge-lora"]) == 2
    assert "no LoRA adapters to merge" in capsys.readouterr().err


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chatml", "llama3"])
def test_builtin_templates_have_an_equivalent_jinja_form(backbones, template):
    """The exported processor's chat template renders exactly what mllm's built-in template renders."""
    from transformers import AutoTokenizer

    from mllm.data.templates import get_template
    from mllm.export.jinja import template_jinja

    tok = AutoTokenizer.from_pretrained(backbones["llama"])
    ours = get_template(template, tok)
    tok.chat_template = template_jinja(template, tok)
    turns = [
        {"role": "user", "content": "<image>\nWhat {shape} is it?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "Color?"},
    ]
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        for messages, prompt in ((system + turns, True), (system + turns[:2], False)):
            expected = ours.render(messages, add_generation_prompt=prompt).text
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == expected
