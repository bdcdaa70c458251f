"""The OpenAI chat-completions request, checked, and turned into a `Conversation` the processor understands.

Every way a request can be wrong ends in `RequestError(status, message)`: the server answers it as JSON
`{"error": {"message": ..., "type": ..., "code": status}}` and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.errors import BadSampleError
from mllm.data.images import open_image, resolve_image_path
from mllm.inference import Conversation, SamplingConfig


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP code, `message` says what is wrong and what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def option(default, help: str):
    """A config field whose help text becomes its `mllm serve` option's help."""
    return field(default=default, metadata={"help": help})


@dataclass
class Limits:
    """What one request may carry."""

    max_request_bytes: int = option(
        20 * 2**20, "largest request body (JSON, base64 images included); larger: 413"
    )
    max_image_bytes: int = option(10 * 2**20, "largest image file (decoded); larger: 413")
    max_image_pixels: int = option(
        4096 * 4096, "most pixels (width x height) per image, checked before decoding: 400"
    )
    max_images: int = option(8, "most images in one request, all messages together; more: 400")
    max_tokens: int = option(1024, "largest max_tokens a request may ask for; more: 400")


class ImageURL(BaseModel):
    url: str


class Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


class ChatRequest(BaseModel):
    """The fields of OpenAI's `POST /v1/chat/completions` that mllm honours; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1


def parse_request(body: bytes) -> ChatRequest:
    """JSON bytes → `ChatRequest`; malformed JSON or a wrong field → 400 naming the field."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise RequestError(400, f"invalid request: {problems}") from None


def sampling_of(req: ChatRequest, limits: Limits) -> tuple[SamplingConfig, list[str]]:
    """The request's `SamplingConfig` and stop strings, within the server's limits."""
    if req.n != 1:
        raise RequestError(400, f"n={req.n}: this server returns one choice per request (n=1)")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(256, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise RequestError(400, "stop: give at most 4 non-empty strings")
    return SamplingConfig(max_tokens, req.temperature, req.top_p), stop


_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,(.*)$", re.DOTALL)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def load_image_url(url: str, image_dir: str | None, limits: Limits) -> Image.Image:
    """A `data:image/...;base64,` URL, or a path relative to `image_dir`; never a network fetch."""
    if m := _DATA_URL.match(url):
        if len(m.group(1)) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(413, f"image is larger than the limit of {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(m.group(1), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image data URL: the payload is not valid base64") from None
        return _open(data, image_dir or "", limits)
    if url.startswith("data:"):
        raise RequestError(400, "image data URL: expected data:image/<type>;base64,<data>")
    if _SCHEME.match(url):
        raise RequestError(
            400, f"image_url {url[:80]!r}: this server never fetches URLs; send the image as a data: URL"
        )
    if image_dir is None:
        raise RequestError(400, "image_url is a file path, but the server was started without --image-dir")
    return _open(url, image_dir, limits)


def _open(ref: str | bytes, image_dir: str, limits: Limits) -> Image.Image:
    """Decode image bytes, or the file `ref` under `image_dir` (which `resolve_image_path` keeps it inside)."""
    try:
        if isinstance(ref, str) and os.path.isfile(path := resolve_image_path(image_dir, ref)):
            if os.path.getsize(path) > limits.max_image_bytes:
                raise RequestError(
                    413, f"image {ref!r} is larger than the limit of {limits.max_image_bytes} bytes"
                )
        return open_image(ref, image_dir, limits.max_image_pixels)
    except BadSampleError as e:
        what = f"image_url {ref[:80]!r}" if isinstance(ref, str) else "image_url"
        reason = {  # the server's own paths stay out of the answer
            "unsafe_image_path": "not inside the server's image directory (no '..', absolute paths or symlinks out)",
            "missing_image": "not found in the server's image directory",
        }.get(e.kind, e.reason)
        raise RequestError(400, f"{what}: {reason}") from None


def to_conversation(req: ChatRequest, image_dir: str | None, limits: Limits) -> Conversation:
    """OpenAI messages → a `Conversation`: each image part becomes one placeholder line, in order.

    `[image, text]` gives "<image>\\ntext", the prompt `mllm chat --image I --prompt text` builds.
    """
    urls = [
        p.image_url.url for m in req.messages if isinstance(m.content, list) for p in m.content if p.image_url
    ]
    if len(urls) > limits.max_images:
        raise RequestError(
            400, f"{len(urls)} images in one request; this server takes at most {limits.max_images}"
        )
    messages, images = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i != 0:
            raise RequestError(400, f"messages[{i}]: a system message may only come first")
        parts = [Part(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        lines = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise RequestError(400, f"{where}: a text part needs 'text'")
                if IMAGE_PLACEHOLDER in part.text:
                    raise RequestError(
                        400,
                        f"{where}: text may not contain {IMAGE_PLACEHOLDER}; send images as image_url parts",
                    )
                lines.append(part.text)
            else:
                if part.image_url is None:
                    raise RequestError(400, f"{where}: an image_url part needs 'image_url': {{'url': ...}}")
                if role != "user":
                    raise RequestError(400, f"{where}: only user messages may carry images")
                images.append(load_image_url(part.image_url.url, image_dir, limits))
                lines.append(IMAGE_PLACEHOLDER)
        messages.append({"role": role, "content": "\n".join(lines)})
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's (the server answers it)")
    return Conversation(messages, images)
