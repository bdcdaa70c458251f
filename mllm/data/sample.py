"""The one shape every source format is normalised into, and the conversation checks shared by all formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.errors import BadSampleError

ImageRef = str | bytes | Image.Image
"""A path (relative to the image root), encoded image bytes, or a decoded image."""

ROLES = ("system", "user", "assistant")

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
"""Speaker names used by LLaVA / ShareGPT / OpenAI files → our three roles. Anything else is a bad sample."""


@dataclass
class Sample:
    """One normalised training example: messages with `<image>` placeholders and the images they refer to."""

    id: str
    messages: list[dict[str, str]]
    images: list[ImageRef] = field(default_factory=list)


def role_of(speaker) -> str:
    role = ROLE_ALIASES.get(str(speaker).strip().lower()) if isinstance(speaker, str) else None
    if role is None:
        raise BadSampleError(
            "unknown_role", f"unknown role {speaker!r}; expected one of {sorted(ROLE_ALIASES)}"
        )
    return role


def validate(sample: Sample) -> None:
    """Raise BadSampleError for conversations that cannot train anything or do not match their images."""
    if not sample.messages:
        raise BadSampleError("empty_conversation", "the conversation has no turns")
    for i, m in enumerate(sample.messages):
        if m.get("role") not in ROLES:
            raise BadSampleError("unknown_role", f"turn {i}: unknown role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise BadSampleError(
                "bad_content", f"turn {i}: content must be text, got {type(m.get('content')).__name__}"
            )
    answers = [m for m in sample.messages if m["role"] == "assistant"]
    if not answers:
        raise BadSampleError("no_assistant_turn", "the conversation has no assistant turn to learn from")
    if not any(m["content"].replace(IMAGE_PLACEHOLDER, "").strip() for m in answers):
        raise BadSampleError("empty_answer", "every assistant turn is empty")
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in sample.messages)
    if n_placeholders != len(sample.images):
        raise BadSampleError(
            "image_count_mismatch",
            f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(sample.images)} image(s); "
            f"each image needs exactly one {IMAGE_PLACEHOLDER} in the text",
        )
