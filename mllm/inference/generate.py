"""Generation with the LLM's own `generate`: visual tokens spliced into `inputs_embeds`, KV cache, left-padded batches.

Temperature 0 means greedy decoding. Streaming uses transformers' streamers (`TextStreamer` and friends).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO

import torch
from PIL import Image
from transformers import TextStreamer

from mllm.inference.processor import Conversation, Message, Processor


@dataclass
class SamplingConfig:
    """How new tokens are chosen."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy (deterministic); > 0 samples from the softened distribution."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (sampling only)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


class StreamPrinter(TextStreamer):
    """Writes each finished piece of text to `out` as soon as it is decoded (prompt skipped)."""

    def __init__(self, tokenizer, out: TextIO | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out or sys.stdout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        if stream_end:
            self.out.write("\n")
        self.out.flush()


def stop_token_ids(model, processor: Processor) -> list[int]:
    """End-of-turn ids: the template's and tokenizer's, plus whatever the LLM's generation config declares."""
    ids = set(processor.stop_token_ids())
    declared = model.llm.generation_config.eos_token_id
    ids.update(declared if isinstance(declared, list) else [declared])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate_batch(
    model,
    processor: Processor,
    conversations: list[Conversation],
    sampling: SamplingConfig | None = None,
    streamer=None,
) -> list[str]:
    """Answer each conversation (one batch, left-padded); returns the decoded new text per conversation.

    `streamer` gets transformers' streamer calls: `put` with the prompt ids first, then each step's new ids ([B]),
    and `end()`. A `TextStreamer` handles a batch of one only (it says so); `mllm.serve` streams whole batches.
    """
    sampling = sampling or SamplingConfig()
    batch = processor(conversations)
    device = next(model.llm.parameters()).device
    pixel_values = batch["pixel_values"]
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    input_ids = batch["input_ids"].to(device)
    instruction = {
        k: batch[k].to(device) for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch
    }
    embeds = model.embed(
        input_ids, pixel_values, batch["image_counts"], image_sizes=batch.get("image_sizes"), **instruction
    )  # [B, T, D]
    new_ids = model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=sampling.max_new_tokens,
        use_cache=True,  # training turns the cache off in the LLM config; generation wants it
        pad_token_id=processor.pad_token_id,
        eos_token_id=stop_token_ids(model, processor),
        streamer=streamer,
        **_last_logits_only(model.llm, device),
        **sampling.generate_kwargs(),
    )  # [B, new]: with inputs_embeds only, generate returns just the continuation
    return [t.strip() for t in processor.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]


def _last_logits_only(llm, device: torch.device) -> dict:
    """Logits at the last position only, asked for so that the head reads a contiguous tensor.

    `generate` asks for `logits_to_keep=1`, which hands the vocabulary head a strided slice of the prompt's hidden
    states; on a CPU, torch's matmul then copies the whole head weight once per sequence (most of a batch's
    generation time: docs/measurements.md). An index tensor makes the slice a small contiguous copy instead.
    """
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return {}
    return {"logits_to_keep": torch.tensor([-1], device=device)}


def generate(
    model,
    processor: Processor,
    images: list[Image.Image | str | os.PathLike] | None,
    messages: list[Message] | str,
    sampling: SamplingConfig | None = None,
    streamer=None,
) -> str:
    """Answer one conversation. `messages` may be a plain prompt; its images then go before it."""
    conv = (
        Conversation.single(messages, images)
        if isinstance(messages, str)
        else Conversation(messages, list(images or []))
    )
    return generate_batch(model, processor, [conv], sampling, streamer)[0]


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def batched(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
