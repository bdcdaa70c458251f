"""Data source formats: one small file each, one registry line each; `auto` picks the format from the file.

Every source is random-access with exact lengths up front: llava, messages,
captions, parquet, hf, and webdataset (tar shards, indexed by their headers).
"""

from __future__ import annotations

import os

from mllm.data.recipe import SourceSpec
from mllm.data.sources.base import Source
from mllm.data.sources.captions import CaptionSource
from mllm.data.sources.llava import LlavaSource
from mllm.data.sources.messages import MessagesSource
from mllm.data.sources.records import first_record
from mllm.data.sources.table import HFDiskSource, ParquetSource
from mllm.data.sources.webdataset import WebDatasetSource, is_webdataset
from mllm.registry import Registry

SOURCES: Registry = Registry("data source format")
SOURCES.register("llava")(LlavaSource)
SOURCES.register("messages")(MessagesSource)
SOURCES.register("captions")(CaptionSource)
SOURCES.register("parquet")(ParquetSource)
SOURCES.register("hf")(HFDiskSource)
SOURCES.register("webdataset")(WebDatasetSource)
SOURCES.alias("sharegpt", "llava")  # `conversations` of from/value turns: ShareGPT's layout, which LLaVA uses
SOURCES.alias("openai", "messages")  # `messages` of role/content turns: OpenAI's chat layout

ALL_FORMATS = SOURCES.names()


def detect_format(path: str) -> str:
    """The format of the data at `path`: the first registered source whose `detect` accepts it."""
    first = first_record(path) if path.endswith((".json", ".jsonl")) and os.path.isfile(path) else None
    for name in SOURCES.names():
        if SOURCES.get(name).detect(path, first):
            return name
    keys = sorted(first) if isinstance(first, dict) else None
    raise ValueError(
        f"{path}: cannot tell the data format{f' from record keys {keys}' if keys else ''}; "
        f"set `format:` to one of {', '.join(ALL_FORMATS)}"
    )


def source_format(spec: SourceSpec) -> str:
    """The registered format name of `spec`: detected for `auto`, an alias (`sharegpt`, `openai`) resolved."""
    if spec.format == "auto":
        return detect_format(spec.path)
    if spec.format not in SOURCES:
        known = ", ".join([*ALL_FORMATS, *SOURCES.aliases()])
        raise KeyError(f"unknown data source format {spec.format!r}; known: {known}")
    return SOURCES.canonical(spec.format)


def open_source(spec: SourceSpec) -> Source:
    """Open a random-access source a recipe entry names (the data must exist)."""
    if not os.path.exists(spec.path) and not is_webdataset(spec.path):  # a shard pattern names no one file
        raise FileNotFoundError(f"data source {spec.name!r}: {spec.path} does not exist")
    return SOURCES.get(source_format(spec))(spec)


__all__ = ["ALL_FORMATS", "SOURCES", "Source", "detect_format", "open_source", "source_format"]
