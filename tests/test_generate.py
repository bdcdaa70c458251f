"""Generation API: checkpoint → (model, processor); greedy is deterministic; batched (left-padded) = one by one."""

from __future__ import annotations

import pytest
import torch
from helpers import make_checkpoint, make_image


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, backbones):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
    from mllm.inference import load_pretrained

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="full"),
        dtype="fp32",
    )
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", cfg)
    return load_pretrained(ckpt)


def test_generate_is_greedy_deterministic_and_uses_the_image(loaded):
    from mllm.inference import SamplingConfig, generate

    model, processor = loaded
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    a1 = generate(model, processor, [make_image(1)], "What shape is in the image?", greedy)
    a2 = generate(model, processor, [make_image(1)], "What shape is in the image?", greedy)
    b = generate(model, processor, [make_image(2)], "What shape is in the image?", greedy)
    assert a1 == a2 and a1
    assert a1 != b, "a different image must change the greedy answer"


def test_batched_generation_matches_one_by_one(loaded):
    from mllm.inference import Conversation, SamplingConfig, generate_batch

    model, processor = loaded
    greedy = SamplingConfig(max_new_tokens=10)
    convs = [
        Conversation.single(
            "What shape is in the image? Describe the image in detail please.", [make_image(3)]
        ),
        Conversation.single("Color?", [make_image(4)]),
        Conversation.single("Is there a circle?", []),
        Conversation(
            [{"role": "user", "content": "<image>\n<image>\nCompare."}], [make_image(5), make_image(6)]
        ),
    ]
    batch = generate_batch(model, processor, convs, greedy)
    single = [generate_batch(model, processor, [c], greedy)[0] for c in convs]
    assert batch == single


def test_processor_checks_placeholders_and_uses_the_saved_template(loaded):
    from mllm.config import IMAGE_TOKEN_ID
    from mllm.inference import Conversation

    model, processor = loaded
    assert processor.template == "auto" and processor.image_tokens == model.num_image_tokens
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        processor([Conversation([{"role": "user", "content": "<image> hi"}], [])])
    batch = processor(
        [Conversation.single("hi", [make_image(0)]), Conversation.single("a much longer question here", [])]
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[0] == IMAGE_TOKEN_ID).sum() == model.num_image_tokens
    short = int(mask.sum(1).argmin())
    assert mask[:, -1].all() and not mask[short, 0], "rows are left-padded"
    text = processor.tokenizer.decode([i for i in ids[1].tolist() if i >= 0])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"), (
        "generation prompt of the tokenizer's template"
    )


def test_sampling_and_streaming(loaded):
    from transformers import TextIteratorStreamer

    from mllm.inference import SamplingConfig, generate

    model, processor = loaded
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer = generate(
        model, processor, [make_image(1)], "Hi", SamplingConfig(max_new_tokens=8), streamer=streamer
    )
    assert "".join(streamer).strip() == answer
    torch.manual_seed(0)
    sampled = {
        generate(model, processor, [make_image(1)], "Hi", SamplingConfig(8, temperature=1.5, top_p=0.95))
        for _ in range(3)
    }
    assert len(sampled) > 1, "temperature > 0 samples"
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_stop_tokens_include_the_templates_end_of_turn(backbones):
    from transformers import AutoTokenizer

    from mllm.inference import Processor

    tok = AutoTokenizer.from_pretrained(
        backbones["gpt2"]
    )  # eos <|endoftext|>; chatml ends turns with <|im_end|>
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    processor = Processor(tok, vision=None, template="chatml", image_tokens=4)
    assert set(processor.stop_token_ids()) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_vocabulary_head_reads_only_the_last_position_contiguously(tmp_path, backbones, mode):
    """The prompt's prefill must not run the head on every position, nor hand it a strided slice (on a CPU
    that copies the head weight once per sequence); a LoRA wrapper must not hide this from `generate`."""
    from mllm.config import ConnectorConfig, LLMConfig, LoraSettings, ModelConfig, VisionConfig
    from mllm.inference import Conversation, SamplingConfig, generate_batch, load_pretrained

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode=mode, lora=LoraSettings(r=4, alpha=8)),
        dtype="fp32",
    )
    model, processor = load_pretrained(make_checkpoint(tmp_path / "c", cfg))
    seen = []
    head = model.llm.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    convs = [
        Conversation.single("Describe the image in detail.", [make_image(7)]),
        Conversation.single("Hi?", []),
    ]
    try:
        generate_batch(model, processor, convs, SamplingConfig(max_new_tokens=3))
    finally:
        hook.remove()
    assert seen and all(h.shape[:2] == (2, 1) and h.is_contiguous() for h in seen), [h.shape for h in seen]


def test_merged_adapters_answer_like_the_unmerged_ones(tmp_path, backbones):
    """eval and chat fold LoRA into the base by default: the same logits (fp32), no peft wrapper left; a 4-bit
    base keeps its adapters (merging would round them to 4 bits)."""
    from peft import PeftModel

    from mllm.config import ConnectorConfig, LLMConfig, LoraSettings, ModelConfig, VisionConfig
    from mllm.inference import Conversation, load_pretrained

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="lora", lora=LoraSettings(r=4, alpha=8)),
        dtype="fp32",
    )
    ckpt = make_checkpoint(tmp_path / "c", cfg)
    kept, processor = load_pretrained(ckpt)
    merged, _ = load_pretrained(ckpt, merge_adapters=True)
    assert isinstance(kept.llm, PeftModel) and not isinstance(merged.llm, PeftModel)
    assert merged.config.llm.mode == "full"
    batch = processor([Conversation.single("Describe the image.", [make_image(8)])])

    def logits(model):
        with torch.no_grad():
            embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_counts"])
            return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits

    with_adapters = logits(kept)
    with kept.llm.disable_adapter():
        assert (logits(kept) - with_adapters).abs().max() > 1e-2, "the test's adapters must change the answer"
    torch.testing.assert_close(logits(merged), with_adapters, rtol=1e-4, atol=1e-4)
    four_bit, _ = load_pretrained(ckpt, load_4bit=True, merge_adapters=True)
    assert isinstance(four_bit.llm, PeftModel) and four_bit.config.llm.mode == "qlora"
