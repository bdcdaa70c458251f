"""`Processor`: images + chat messages → model inputs, using the template and image settings saved in the checkpoint.

Prompts are encoded by `mllm.data.encode_conversation`, the same function training used, so a
checkpoint is prompted exactly as it was trained. Batches are left-padded for generation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.encode import ConversationEncoder
from mllm.data.errors import BadSampleError
from mllm.data.instruction import encode_instructions, instruction_text
from mllm.data.layout import ImageLayout
from mllm.inference.images import as_image
from mllm.model import load_tokenizer

Message = dict[str, str]
"""`{"role": "system" | "user" | "assistant", "content": text with one "<image>" per image}`."""


@dataclass
class Conversation:
    """One generation request: the messages so far and the images their placeholders stand for, in order."""

    messages: list[Message]
    images: list[Image.Image | str | os.PathLike] = field(default_factory=list)

    @classmethod
    def single(cls, prompt: str, images: list | None = None) -> Conversation:
        """One user turn; images without placeholders in `prompt` go before it, one per line (LLaVA style)."""
        images = list(images or [])
        if images and IMAGE_PLACEHOLDER not in prompt:
            prompt = f"{IMAGE_PLACEHOLDER}\n" * len(images) + prompt
        return cls([{"role": "user", "content": prompt}], images)


class Processor:
    """Turns `Conversation`s into `input_ids` / `attention_mask` / `pixel_values` / `image_sizes` / `image_counts`
    (and, for an instruction-aware Q-Former, `qformer_input_ids` / `qformer_attention_mask`).

    `layout`: the model's `ImageLayout` (tiles, token counts and budgets exactly as in training); default: a square
    layout of `image_tokens` per image."""

    def __init__(
        self,
        tokenizer,
        vision,
        template: str,
        image_tokens: int,
        system_prompt: str | None = None,
        max_length: int | None = None,
        config: dict | None = None,
        instruction_tokenizer=None,
        instruction_max_tokens: int = 128,
        layout: ImageLayout | None = None,
    ):
        self.config = config or {}
        """The checkpoint's saved config (template, run settings), when built from one."""
        self.encoder = ConversationEncoder(tokenizer, template, image_tokens)
        self.tokenizer = tokenizer
        self.vision = vision
        self.template = template
        self.image_tokens = image_tokens
        self.layout = layout or ImageLayout.fixed(image_tokens)
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.instruction_tokenizer = instruction_tokenizer
        """An instruction-aware Q-Former's tokenizer: batches then carry each image's instruction ids (the last user
        turn's text, `mllm.data.instruction`)."""
        self.instruction_max_tokens = instruction_max_tokens

    @classmethod
    def from_checkpoint(cls, model, config: dict[str, Any]) -> Processor:
        """The processor a checkpoint was trained with: its tokenizer, template, system prompt and image tokens."""
        return cls(
            tokenizer=load_tokenizer(model.config),
            vision=model.vision,
            template=config.get("template", "auto"),
            image_tokens=model.num_image_tokens,
            system_prompt=config.get("system_prompt"),
            max_length=config.get("max_length"),
            config=config,
            instruction_tokenizer=model.connector.tokenizer
            if model.config.connector.instruction_aware
            else None,
            instruction_max_tokens=model.config.connector.instruction_max_tokens,
            layout=model.image_layout,
        )

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def with_system(self, messages: list[Message]) -> list[Message]:
        """Prepend the checkpoint's system prompt unless the conversation brings its own."""
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def prompt_ids(self, messages: list[Message], image_tokens: list[int] | None = None) -> list[int]:
        """Token ids of the conversation followed by the assistant's generation prompt (`image_tokens`: per image)."""
        ids, _ = self.encoder.encode(self.with_system(messages), True, image_tokens)
        return list(ids)

    def stop_token_ids(self) -> list[int]:
        """Ids that end an answer: eos, and the template's end-of-turn text when it is a single token."""
        tok = self.tokenizer
        ids = {tok.eos_token_id}
        fmt = getattr(self.encoder.template, "fmt", None)  # built-in templates say how an answer ends
        if fmt is not None:
            end = fmt.assistant_end.format(eos=tok.eos_token or "", bos=tok.bos_token or "").strip()
            end_ids = tok(end, add_special_tokens=False)["input_ids"] if end else []
            if len(end_ids) == 1:
                ids.add(end_ids[0])
        return sorted(i for i in ids if i is not None)

    def __call__(self, conversations: list[Conversation]) -> dict[str, torch.Tensor]:
        rows, images, counts, instructions = [], [], [], []
        for i, conv in enumerate(conversations):
            placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in conv.messages)
            if placeholders != len(conv.images):
                raise ValueError(
                    f"conversation {i}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(conv.images)} image(s); "
                    "give one image per placeholder"
                )
            opened = [as_image(im) for im in conv.images]
            try:
                image_tokens = self.layout.token_counts([im.size for im in opened])
            except BadSampleError as e:
                raise ValueError(f"conversation {i}: [{e.kind}] {e.reason}") from None
            ids = self.prompt_ids(conv.messages, image_tokens)
            if self.max_length and len(ids) > self.max_length:
                raise ValueError(
                    f"conversation {i}: the prompt is {len(ids)} tokens, longer than the checkpoint's max_length "
                    f"{self.max_length}; shorten it (in chat: /reset)"
                )
            rows.append(ids)
            images.extend(opened)
            counts.append(len(conv.images))
            instructions.extend([instruction_text(conv.messages)] * len(conv.images))
        width = max(len(r) for r in rows)
        # Left padding: every row's last prompt token sits at the same position, where generation continues.
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        pixel_values, sizes = self.layout.pixels(images, self.vision.preprocess) if images else (None, None)
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "pixel_values": pixel_values,  # [tiles, 3, H, W]
            "image_sizes": sizes,  # [images, 2]
            "image_counts": torch.tensor(counts, dtype=torch.long),
        }
        if self.instruction_tokenizer is not None and instructions:
            ids, imask = encode_instructions(
                self.instruction_tokenizer, instructions, self.instruction_max_tokens
            )
            batch.update(qformer_input_ids=ids, qformer_attention_mask=imask)
        return batch
