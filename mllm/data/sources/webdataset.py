"""webdataset tar shards, streamed: members sharing a key (`0001.jpg`, `0001.json` / `0001.txt`) form one sample.

The JSON may hold LLaVA `conversations`, OpenAI `messages` or a `caption`;
a `.txt` member is a caption. Images are the image members in name order.
Shards are read sequentially (no random access, no index), so this source
feeds a `StreamingDataset` rather than the length-indexed `MultimodalDataset`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from mllm.data.errors import BadSampleError
from mllm.data.sample import Sample
from mllm.data.sources.captions import caption_sample
from mllm.data.sources.llava import conversations_sample
from mllm.data.sources.messages import messages_sample
from mllm.data.sources.records import UNPARSABLE, describe_parse_error

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(pattern: str) -> list[str]:
    """`shards/data-{0000..0099}.tar` (webdataset brace notation), a glob, a folder of .tar, or one file."""
    m = _BRACE.search(pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        return [
            p
            for i in range(int(lo), int(hi) + 1)
            for p in expand_shards(pattern[: m.start()] + str(i).zfill(len(lo)) + pattern[m.end() :])
        ]
    if os.path.isdir(pattern):
        return sorted(glob.glob(os.path.join(pattern, "*.tar")))
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern]


def is_webdataset(path: str) -> bool:
    return (
        path.endswith(".tar")
        or bool(_BRACE.search(path))
        or (os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.tar"))))
    )


def _split_key(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    folder = os.path.dirname(name)
    key, _, ext = base.partition(".")
    return os.path.join(folder, key), ext.lower()


def read_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one shard, streaming."""
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_key(member.name)
            if k != key and files:
                yield key, files
                files = {}
            key = k
            files[ext] = tar.extractfile(member).read()
    if files:
        yield key, files


def shard_sample(key: str, files: dict[str, bytes], prompt: str) -> Sample:
    images = [files[e] for e in sorted(files) if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
    if "json" in files:
        try:
            rec: Any = json.loads(files["json"])
        except UNPARSABLE as e:
            raise BadSampleError("invalid_json", f"{key}.json: {describe_parse_error(e)}") from None
        if not isinstance(rec, dict):
            raise BadSampleError("invalid_record", f"{key}.json must be an object")
        rec = {"id": key, **rec}
        if "conversations" in rec:
            return conversations_sample({**rec, "image": images}, key)
        if "messages" in rec:
            return messages_sample({**rec, "images": images}, key)
        text = rec.get("caption", rec.get("text", files.get("txt", b"").decode("utf-8", "replace")))
        return caption_sample(
            {"id": rec["id"], "image": images, "caption": text}, key, "image", "caption", prompt
        )
    if "txt" in files:
        text = files["txt"].decode("utf-8", "replace")
        return caption_sample({"id": key, "image": images, "caption": text}, key, "image", "caption", prompt)
    raise BadSampleError("invalid_record", f"sample {key} has no .json or .txt member (has {sorted(files)})")
