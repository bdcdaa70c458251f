"""Caption pairs: JSONL / CSV rows (Parquet via the `parquet` source) with an image and a caption.

Each row becomes a two-turn conversation: the source's `prompt` (default
`<image>`) and the caption as the answer. With the `plain` template that is
the LLaVA stage-1 pretraining layout: image tokens, then the caption.
"""

from __future__ import annotations

import csv
from typing import Any

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.errors import BadSampleError
from mllm.data.recipe import SourceSpec
from mllm.data.sample import Sample
from mllm.data.sources.base import RecordFileSource
from mllm.data.sources.records import JsonRecords, image_refs

IMAGE_COLUMNS = ("image", "images", "image_path", "file_name", "filename", "path", "jpg", "png")
TEXT_COLUMNS = ("caption", "text", "txt", "alt_text", "sentence")


def pick_column(columns, wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{where}: no {what} column {wanted!r}; columns are {sorted(columns)}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(
        f"{where}: cannot find the {what} column among {sorted(columns)}; set `{what}_column:` on the source"
    )


def caption_sample(
    rec: dict[str, Any], fallback_id: str, image_col: str, text_col: str, prompt: str
) -> Sample:
    caption = rec.get(text_col)
    if not isinstance(caption, str):
        raise BadSampleError(
            "bad_content", f"caption column {text_col!r} must be text, got {type(caption).__name__}"
        )
    images = image_refs(rec.get(image_col))
    if not images:
        raise BadSampleError("missing_image", f"caption row has no image in column {image_col!r}")
    if prompt.count(IMAGE_PLACEHOLDER) != len(images) and prompt == IMAGE_PLACEHOLDER:
        prompt = "\n".join([IMAGE_PLACEHOLDER] * len(images))
    rid = rec.get("id", rec.get("key", rec.get("__key__")))
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
    return Sample(id=str(rid) if rid is not None else fallback_id, messages=messages, images=images)


def is_caption_record(first: Any) -> bool:
    return (
        isinstance(first, dict)
        and any(c in first for c in IMAGE_COLUMNS)
        and any(c in first for c in TEXT_COLUMNS)
        and "conversations" not in first
        and "messages" not in first
    )


class CsvRows:
    """CSV rows as dicts, with the line each row starts on."""

    def __init__(self, path: str):
        self.rows: list[dict[str, str]] = []
        self.lines: list[int] = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            start = 2
            try:
                for row in reader:
                    self.rows.append(row)
                    self.lines.append(start)
                    start = reader.line_num + 1
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: not UTF-8 text after line {start - 1} ({e.reason}); re-encode it as UTF-8"
                ) from None
            self.columns = reader.fieldnames or []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, str]:
        return self.rows[i]

    def line(self, i: int) -> int:
        return self.lines[i]

    def raw_id(self, i: int) -> str | None:
        return self.rows[i].get("id")

    def first(self) -> dict[str, str] | None:
        return self.rows[0] if self.rows else None


class CaptionSource(RecordFileSource):
    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.records = CsvRows(spec.path) if spec.path.endswith(".csv") else JsonRecords(spec.path)
        first = self.records.first() or {}
        columns = list(first) if not isinstance(self.records, CsvRows) else self.records.columns
        self.image_col = pick_column(columns, spec.image_column, IMAGE_COLUMNS, "image", spec.path)
        self.text_col = pick_column(columns, spec.text_column, TEXT_COLUMNS, "text", spec.path)

    @classmethod
    def detect(cls, path: str, first: Any) -> bool:
        return path.endswith(".csv") or (path.endswith((".json", ".jsonl")) and is_caption_record(first))

    def sample(self, index: int) -> Sample:
        rec = self.records[index]
        return caption_sample(rec, f"{self.name}:{index}", self.image_col, self.text_col, self.spec.prompt)
