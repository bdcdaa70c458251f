"""OpenAI / ShareGPT messages: `messages: [{role, content}]`, content a string or `{type: text|image}` parts, `images`.

An image part may carry its own reference (`image`, `path`, or `image_url.url`
as a file path or a base64 `data:` URI); otherwise images are taken in order
from the record's `images` list. String content uses `<image>` placeholders.
"""

from __future__ import annotations

import base64
from typing import Any

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.errors import BadSampleError
from mllm.data.recipe import SourceSpec
from mllm.data.sample import Sample, role_of
from mllm.data.sources.base import RecordFileSource
from mllm.data.sources.records import JsonRecords, image_refs


def _part_ref(part: dict[str, Any]) -> Any:
    ref = part.get("image") or part.get("path")
    if ref is None and isinstance(part.get("image_url"), dict):
        ref = part["image_url"].get("url")
    elif ref is None:
        ref = part.get("image_url")
    if isinstance(ref, str) and ref.startswith("data:"):
        try:
            return base64.b64decode(ref.split(",", 1)[1])
        except (IndexError, ValueError) as e:
            raise BadSampleError("unreadable_image", f"bad base64 data URI: {e}") from None
    return ref


def _content(content: Any, turn: int, inline: list) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadSampleError("bad_content", f"turn {turn}: content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_PLACEHOLDER)
            inline.append(_part_ref(part))
        else:
            raise BadSampleError(
                "bad_content", f"turn {turn}: unknown content part {part!r}; expected type text|image"
            )
    return "\n".join(pieces)


def messages_sample(rec: dict[str, Any], fallback_id: str) -> Sample:
    """A record with `messages: [{role, content}]` (and optionally `images`) → Sample."""
    turns = rec.get("messages")
    if not isinstance(turns, list):
        raise BadSampleError("invalid_record", "`messages` must be a list of {role, content} messages")
    listed = image_refs(rec.get("images", rec.get("image")))
    inline: list = []
    messages = []
    for i, m in enumerate(turns):
        content = (
            m.get("content", m.get("value")) if isinstance(m, dict) else None
        )  # ShareGPT says from/value
        if content is None:
            raise BadSampleError("invalid_record", f"message {i} must be an object with `role` and `content`")
        messages.append(
            {"role": role_of(m.get("role", m.get("from"))), "content": _content(content, i, inline)}
        )
    # a part without its own reference takes the next entry of `images`
    it = iter(listed)
    images = [ref if ref is not None else next(it, None) for ref in inline]
    if any(ref is None for ref in images):
        raise BadSampleError(
            "image_count_mismatch", f"{len(inline)} image part(s) but {len(listed)} image(s) listed"
        )
    images += list(it)  # string content with <image> placeholders uses the list directly
    rid = rec.get("id")
    return Sample(id=str(rid) if rid is not None else fallback_id, messages=messages, images=images)


class MessagesSource(RecordFileSource):
    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.records = JsonRecords(spec.path)

    @classmethod
    def detect(cls, path: str, first: Any) -> bool:
        return path.endswith((".json", ".jsonl")) and isinstance(first, dict) and "messages" in first

    def sample(self, index: int) -> Sample:
        return messages_sample(self.records[index], f"{self.name}:{index}")
