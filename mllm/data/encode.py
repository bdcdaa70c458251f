"""Conversation → (input_ids, labels), built together: one tokenisation of the rendered text, labels from spans.

Image `i`'s `<image>` becomes `image_tokens[i]` copies of IMAGE_TOKEN_ID (label IGNORE_INDEX): each image's count is
given (it follows from the image's size, `mllm.data.layout`), or one count serves every image.
Truncation to `max_length` never cuts an image: it only drops text after the
last image; a sample whose images do not all fit is a BadSampleError
(`images_do_not_fit`), never silently shortened.
Labels are the token ids inside the template's supervised spans (assistant
content + end-of-turn) and IGNORE_INDEX (-100) everywhere else. A token that mixes supervised
text with non-whitespace scaffolding is a template/tokenizer mismatch: it
raises, it never zeroes the sample's labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mllm.config import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from mllm.data.errors import BadSampleError
from mllm.data.templates import Template, get_template


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    """Images in the sample (truncation never drops one)."""
    full_length: int
    """Length before truncation."""
    image_tokens: list[int] = field(default_factory=list)
    """Each image's visual-token count, in order."""

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def plain_backend(tokenizer):
    """`tokenizer`'s Rust backend without the padding and truncation its tokenizer.json may carry (a
    sentence-transformers export such as all-MiniLM-L6-v2's pads and cuts every text to 128 tokens).
    `tokenizer(text)` lifts them for each call; the encoder calls the backend itself, so it lifts them once, on a
    copy (the caller's tokenizer is left as it was)."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is None and backend.truncation is None:
        return backend
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


class ConversationEncoder:
    """Holds the template and tokenizer for many `encode` calls (the dataset makes one)."""

    def __init__(
        self, tokenizer, template: str | Template, image_tokens: int = 0, max_length: int | None = None
    ):
        """`image_tokens`: the count every image gets when `encode` is not given per-image counts."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "mllm needs a fast (Rust) tokenizer for exact label offsets; load it with use_fast=True"
            )
        if image_tokens < 0:
            raise ValueError(f"image_tokens must be >= 0, got {image_tokens}")
        self.tokenizer = tokenizer
        self.backend = plain_backend(tokenizer)
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self.image_tokens = image_tokens
        self.max_length = max_length

    def encode(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = False,
        image_tokens: list[int] | None = None,
    ) -> tuple[list[int], list[int]]:
        enc = self.encode_full(messages, add_generation_prompt, image_tokens)
        return enc.input_ids, enc.labels

    def encode_full(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = False,
        image_tokens: list[int] | None = None,
    ) -> Encoded:
        """Like `encode`, also saying how many images the sample has and its untruncated length.

        `image_tokens`: each image's visual-token count, in placeholder order (default: the encoder's one count for
        every image). A count list that disagrees with the placeholders is a BadSampleError.
        """
        rendered = self.template.render(messages, add_generation_prompt)
        ids, labels, image_ends, image_tokens = self._tokenize(rendered.text, rendered.spans, image_tokens)
        full = len(ids)
        if self.max_length is not None and full > self.max_length and not add_generation_prompt:
            if image_ends and image_ends[-1] > self.max_length:
                raise BadSampleError(
                    "images_do_not_fit",
                    f"{full} tokens with its {len(image_ends)} image(s) expanded; image tokens reach position "
                    f"{image_ends[-1]}, past max_length={self.max_length} (an image is never cut or dropped: "
                    "raise max_length, lower the image budget, or split the sample)",
                )
            ids, labels = self._truncate(ids, labels)
        return Encoded(ids, labels, len(image_ends), full, image_tokens)

    def _tokenize(
        self, text: str, spans: list[tuple[int, int]], image_tokens: list[int] | None
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        chunks = text.split(IMAGE_PLACEHOLDER)
        if image_tokens is None:
            image_tokens = [self.image_tokens] * (len(chunks) - 1)
        elif len(image_tokens) != len(chunks) - 1:
            raise BadSampleError(
                "image_count_mismatch",
                f"{len(chunks) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image_tokens)} image(s)",
            )
        # the Rust tokenizer one chunk at a time: the same ids and offsets as `tokenizer(chunks)`, without the
        # thread-pool wake-ups of batch encoding, which dominate for a few short chunks per sample
        encodings = [self.backend.encode(chunk, add_special_tokens=False) for chunk in chunks]
        ids: list[int] = []
        labels: list[int] = []
        image_ends: list[int] = []
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
                ids.extend([IMAGE_TOKEN_ID] * image_tokens[c])
                labels.extend([IGNORE_INDEX] * image_tokens[c])
                image_ends.append(len(ids))
                base += len(IMAGE_PLACEHOLDER)
        return ids, labels, image_ends, image_tokens

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
        cut = self.max_length  # after the last image's tokens (checked by the caller)
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
