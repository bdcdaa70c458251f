"""Conversation → (input_ids, labels), built together: one tokenisation of the rendered text, labels from spans.

Each `<image>` becomes `image_tokens` copies of IMAGE_TOKEN_ID (label IGNORE_INDEX).
Labels are the token ids inside the template's supervised spans (assistant
content + end-of-turn) and IGNORE_INDEX (-100) everywhere else. A token that mixes supervised
text with non-whitespace scaffolding is a template/tokenizer mismatch: it
raises, it never zeroes the sample's labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm.config import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from mllm.data.errors import BadSampleError
from mllm.data.templates import Template, get_template


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    """Images whose tokens survived truncation (always the first ones)."""
    full_length: int
    """Length before truncation."""

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


class ConversationEncoder:
    """Holds the template and tokenizer for many `encode` calls (the dataset makes one)."""

    def __init__(self, tokenizer, template: str | Template, image_tokens: int, max_length: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "mllm needs a fast (Rust) tokenizer for exact label offsets; load it with use_fast=True"
            )
        if image_tokens < 0:
            raise ValueError(f"image_tokens must be >= 0, got {image_tokens}")
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self.image_tokens = image_tokens
        self.max_length = max_length

    def encode(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        enc = self.encode_full(messages, add_generation_prompt)
        return enc.input_ids, enc.labels

    def encode_full(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> Encoded:
        """Like `encode`, also saying how many images survived truncation and the untruncated length."""
        rendered = self.template.render(messages, add_generation_prompt)
        ids, labels, image_starts = self._tokenize(rendered.text, rendered.spans)
        full = len(ids)
        if self.max_length is not None and full > self.max_length and not add_generation_prompt:
            ids, labels = self._truncate(ids, labels)
            image_starts = [p for p in image_starts if p + self.image_tokens <= len(ids) and p < len(ids)]
        return Encoded(ids, labels, len(image_starts), full)

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
        chunks = text.split(IMAGE_PLACEHOLDER)
        # the Rust tokenizer one chunk at a time: the same ids and offsets as `tokenizer(chunks)`, without the
        # thread-pool wake-ups of batch encoding, which dominate for a few short chunks per sample
        backend = self.tokenizer.backend_tokenizer
        encodings = [backend.encode(chunk, add_special_tokens=False) for chunk in chunks]
        ids: list[int] = []
        labels: list[int] = []
        image_starts: list[int] = []
        base, si = 0, 0
        for c, encoding in enumerate(encodings):
            chunk_ids, offsets = encoding.ids, encoding.offsets
            for tok, (s, e) in zip(chunk_ids, offsets, strict=True):
                s, e = s + base, e + base
                while si < len(spans) and spans[si][1] <= s:
                    si += 1
                supervised = si < len(spans) and _overlaps(s, e, spans[si])
                if supervised:
                    self._check_boundary(text, s, e, spans[si])
                ids.append(tok)
                labels.append(tok if supervised else IGNORE_INDEX)
            base += len(chunks[c])
            if c < len(chunks) - 1:
                image_starts.append(len(ids))
                ids.extend([IMAGE_TOKEN_ID] * self.image_tokens)
                labels.extend([IGNORE_INDEX] * self.image_tokens)
                base += len(IMAGE_PLACEHOLDER)
        return ids, labels, image_starts

    @staticmethod
    def _check_boundary(text: str, s: int, e: int, span: tuple[int, int]) -> None:
        outside = text[s : max(s, span[0])] + text[min(e, span[1]) : e]
        if outside.strip():
            raise BadSampleError(
                "tokenization_mismatch",
                f"token {text[s:e]!r} joins supervised text with template text {outside!r}; "
                "the template and tokenizer disagree on turn boundaries (try another `template:`)",
            )

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        cut = self.max_length
        # never keep part of an image: back up to the start of the image run the cut falls in
        while cut > 0 and ids[cut - 1] == IMAGE_TOKEN_ID and ids[cut] == IMAGE_TOKEN_ID:
            cut -= 1
        if all(label == IGNORE_INDEX for label in labels[:cut]):
            raise BadSampleError(
                "answer_truncated",
                f"{len(ids)} tokens after image expansion; truncating to max_length={self.max_length} "
                "cuts away the whole first answer (raise max_length or shorten the sample)",
            )
        return ids[:cut], labels[:cut]


def _overlaps(s: int, e: int, span: tuple[int, int]) -> bool:
    if s == e:  # zero-width token (some tokenizers emit these): inside if its position is
        return span[0] <= s < span[1]
    return s < span[1] and e > span[0]


def encode_conversation(
    messages: list[dict[str, str]],
    tokenizer,
    template: str,
    image_tokens: int,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation (see the module docstring). Prefer `ConversationEncoder` in loops."""
    return ConversationEncoder(tokenizer, template, image_tokens, max_length).encode(
        messages, add_generation_prompt
    )
