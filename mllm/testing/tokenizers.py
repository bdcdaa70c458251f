"""Small real byte-level BPE tokenizers with each LM family's special tokens and chat template."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = """
A photo of a red circle on a white background. A blue triangle next to a green square.
What shape is in the image? It is a circle. What color is the shape? The shape is blue.
Is there a yellow rectangle in the picture? Yes, there is. No, there is not.
Describe the image in detail. The image shows a cat sitting on a wooden table near a window.
The quick brown fox jumps over the lazy dog. How many people are in the photo? Two people.
Please answer the question using a single word or phrase. Thank you for your help!
You are a helpful assistant. The user asks questions about images and the assistant answers.
0 1 2 3 4 5 6 7 8 9 10 100 2024 gray orange purple brown black white teal pink
"""


@dataclass(frozen=True)
class Family:
    """What makes a tokenizer look like one LM family's: its special tokens and chat template."""

    special: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    chat_template: str


FAMILIES: dict[str, Family] = {
    "llama": Family(
        special=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|end_of_text|>",
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    ),
    "qwen2": Family(
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    ),
    "gpt2": Family(
        special=("<|endoftext|>",),
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        chat_template=(
            "{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}<|endoftext|>\n"
            "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}{{ m['content'] }}\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
        ),
    ),
    "phi3": Family(
        special=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        bos=None,
        eos="<|end|>",
        pad="<|endoftext|>",
        chat_template=(
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        ),
    ),
}


def make_tokenizer(family: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a small built-in corpus and dress it as `family`'s tokenizer."""
    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fam.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fam.bos,
        eos_token=fam.eos,
        pad_token=fam.pad,
        unk_token=None,
        model_max_length=2048,
    )
    hf.chat_template = fam.chat_template
    return hf
