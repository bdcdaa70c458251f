"""Reading JSON / JSONL record files: JSON arrays parse at once, JSONL lines parse lazily (a broken line is one bad sample)."""

from __future__ import annotations

import json
from typing import Any

from mllm.data.errors import BadSampleError

UNPARSABLE = (ValueError, RecursionError)
"""What `json.loads` raises on hostile text: JSONDecodeError, UnicodeDecodeError (not UTF-8), ValueError (an
integer longer than Python converts), RecursionError (nesting deeper than the parser's recursion limit)."""


def describe_parse_error(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)


class JsonRecords:
    """Records of a `.json` array or a `.jsonl` file, indexable; `line(i)` gives JSONL line numbers."""

    def __init__(self, path: str):
        self.path = path
        self._items: list[Any]
        self._lines: list[int] | None = None
        if path.endswith(".jsonl"):
            self._items, self._lines = [], []
            with open(path, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    if raw.strip():
                        self._items.append(raw)
                        self._lines.append(n)
        else:
            with open(path, "rb") as f:
                try:
                    data = json.load(f)
                except UNPARSABLE as e:
                    raise ValueError(
                        f"{path}: not valid JSON ({describe_parse_error(e)}); JSON Lines files must end in .jsonl"
                    ) from None
            if isinstance(data, dict):
                data = (
                    next((v for v in data.values() if isinstance(v, list)), None) if len(data) == 1 else None
                )
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON array of samples")
            self._items = data

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._items[index]
        if isinstance(item, bytes):
            try:
                item = json.loads(item)
            except UNPARSABLE as e:
                raise BadSampleError("invalid_json", f"not valid JSON: {describe_parse_error(e)}") from None
        if not isinstance(item, dict):
            raise BadSampleError("invalid_record", f"expected a JSON object, got {type(item).__name__}")
        return item

    def line(self, index: int) -> int | None:
        return self._lines[index] if self._lines is not None else None

    def raw_id(self, index: int) -> str | None:
        try:
            rid = self[index].get("id")
        except BadSampleError:
            return None
        return None if rid is None else str(rid)

    def first(self) -> Any:
        for i in range(min(len(self), 8)):
            try:
                return self[i]
            except BadSampleError:
                continue
        return None


def first_record(path: str) -> Any:
    """The first record of a JSON / JSONL file, reading as little as possible (for format detection)."""
    with open(path, "rb") as f:
        if path.endswith(".jsonl"):
            for raw in f:
                if raw.strip():
                    try:
                        return json.loads(raw)
                    except UNPARSABLE:
                        return None
            return None
    return JsonRecords(path).first()


def image_refs(value: Any) -> list:
    """An image field (None, a path, bytes, {bytes, path} as HF `Image` stores it, or a list of those) → refs."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    refs = []
    for v in items:
        if isinstance(v, dict):  # HF datasets Image feature, not decoded
            v = v.get("bytes") or v.get("path")
        if isinstance(v, str) and v.startswith(("http://", "https://")):
            raise BadSampleError(
                "bad_image_path", f"remote image URL {v!r}: download images first, then point to files"
            )
        if not isinstance(v, (str, bytes)) and not hasattr(v, "convert"):
            raise BadSampleError(
                "invalid_record", f"an image must be a path or image bytes, got {type(v).__name__}"
            )
        refs.append(v)
    return refs
