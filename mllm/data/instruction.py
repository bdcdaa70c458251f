"""Instructions for an instruction-aware Q-Former (InstructBLIP): which text, and its ids in the Q-Former's tokenizer.

One rule everywhere (training rows, `mllm eval`, `mllm chat`, generation): an image's instruction is the text of
the **last user turn** of the conversation it belongs to, `<image>` placeholders removed. In a chat that is the
turn being answered now, so a follow-up question re-reads the image for what it asks.
"""

from __future__ import annotations

import torch

from mllm.config import IMAGE_PLACEHOLDER


def instruction_text(messages: list[dict[str, str]]) -> str:
    """The last user turn's text without image placeholders ("" when there is no user turn)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return " ".join(users[-1].replace(IMAGE_PLACEHOLDER, " ").split()) if users else ""


def encode_instructions(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Instruction texts (one per image) → right-padded ids and mask [I, L] in the Q-Former tokenizer's ids.

    At most `max_tokens` tokens each (longer ones are cut at the end, as InstructBLIP does).
    """
    enc = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return enc["input_ids"], enc["attention_mask"]
