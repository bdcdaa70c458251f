"""webdataset tar shards: members sharing a key (`0001.jpg`, `0001.json` / `0001.txt`) form one sample.

The JSON may hold LLaVA `conversations`, OpenAI `messages` or a `caption`;
a `.txt` member is a caption. Images are the image members in name order.

Shards are indexed once when the source opens: only the tar headers are
read (each member's offset and size; no image is decoded), so a shard source
is random-access like every other source. The dataset's exact lengths, the
sampler's per-rank split and resuming at the exact sample then work on shards
as they do on JSON. Shards must be uncompressed tar files (webdataset's own
layout); compressed ones cannot be read at an offset.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from mllm.data.errors import BadSampleError
from mllm.data.recipe import SourceSpec
from mllm.data.sample import Sample
from mllm.data.sources.base import Source
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
    """`dir/0001.seg.png` → (`dir/0001`, `seg.png`): webdataset's key is the name up to the first dot."""
    base = os.path.basename(name)
    folder = os.path.dirname(name)
    key, _, ext = base.partition(".")
    return os.path.join(folder, key), ext.lower()


@dataclass
class ShardIndex:
    """Where every sample's members lie in the shards. Sample i's members are `first[i]:first[i + 1]`."""

    shards: list[str]
    keys: list[str]
    shard_of: np.ndarray
    """[samples] position in `shards`."""
    first: np.ndarray
    """[samples + 1] member ranges."""
    offset: np.ndarray
    """[members] byte offset of the member's data in its shard."""
    size: np.ndarray
    """[members] its size in bytes."""
    ext: list[str]
    """[members] its extension (`jpg`, `json`, `seg.png`)."""

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, i: int) -> dict[str, bytes]:
        """{extension: bytes} of sample `i`, read at the indexed offsets."""
        files = {}
        with open(self.shards[self.shard_of[i]], "rb") as f:
            for m in range(self.first[i], self.first[i + 1]):
                f.seek(int(self.offset[m]))
                files[self.ext[m]] = f.read(int(self.size[m]))
        return files


def index_shards(shards: list[str], where: str) -> ShardIndex:
    """Read the tar headers of `shards` (no member data): members with the same key in a row form a sample."""
    keys, shard_of, first, offset, size, ext = [], [], [], [], [], []
    for si, path in enumerate(shards):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data source {where!r}: webdataset shard {path} does not exist")
        try:
            with tarfile.open(path, mode="r:") as tar:
                members = [m for m in tar if m.isfile()]
        except tarfile.ReadError as e:
            raise ValueError(
                f"data source {where!r}: {path} is not an uncompressed tar file ({e}); webdataset shards are "
                "read at member offsets, so decompress them first (e.g. `gunzip -k shard.tar.gz`)"
            ) from None
        key = None
        for m in members:
            k, e = _split_key(m.name)
            if k != key:
                keys.append(k)
                shard_of.append(si)
                first.append(len(offset))
                key = k
            offset.append(m.offset_data)
            size.append(m.size)
            ext.append(e)
    return ShardIndex(
        shards=shards,
        keys=keys,
        shard_of=np.asarray(shard_of, dtype=np.int32),
        first=np.asarray([*first, len(offset)], dtype=np.int64),
        offset=np.asarray(offset, dtype=np.int64),
        size=np.asarray(size, dtype=np.int64),
        ext=ext,
    )


def _json_member(key: str, files: dict[str, bytes]) -> dict[str, Any] | None:
    if "json" not in files:
        return None
    try:
        rec: Any = json.loads(files["json"])
    except UNPARSABLE as e:
        raise BadSampleError("invalid_json", f"{key}.json: {describe_parse_error(e)}") from None
    if not isinstance(rec, dict):
        raise BadSampleError("invalid_record", f"{key}.json must be an object")
    return rec


def shard_sample(key: str, files: dict[str, bytes], prompt: str) -> Sample:
    """The sample of one key's members: a JSON conversation / messages / caption, or a `.txt` caption."""
    images = [files[e] for e in sorted(files) if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
    rec = _json_member(key, files)
    if rec is not None:
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


class _JsonRecords:
    """Each sample's JSON member as a dict ({} without one), for optional fields such as `question_type`."""

    def __init__(self, index: ShardIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _json_member(self.index.keys[i], self.index.members(i)) or {}


class WebDatasetSource(Source):
    """Tar shards named by a brace pattern (`data-{0000..0099}.tar`), a glob, a folder of .tar, or one .tar."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        shards = expand_shards(spec.path)
        if not shards:
            raise FileNotFoundError(f"data source {spec.name!r}: no webdataset shards match {spec.path}")
        self.index = index_shards(shards, spec.name)
        self.records = _JsonRecords(self.index)

    @classmethod
    def detect(cls, path: str, first: Any) -> bool:
        return is_webdataset(path)

    def files(self) -> list[str]:
        return list(self.index.shards)

    def __len__(self) -> int:
        return len(self.index)

    def raw_id(self, index: int) -> str | None:
        return self.index.keys[index]

    def sample(self, index: int) -> Sample:
        key, shard = self.index.keys[index], self.index.shards[self.index.shard_of[index]]
        try:
            return shard_sample(key, self.index.members(index), self.spec.prompt)
        except BadSampleError as e:
            raise BadSampleError(e.kind, f"{e.reason} (shard {shard})") from None
