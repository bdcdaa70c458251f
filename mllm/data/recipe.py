"""Data recipes: a YAML file naming data sources, image root, chat template and length limit.

A bare data file (`.json`, `.jsonl`, `.csv`, `.parquet`, a `.tar` shard, a shard pattern such as
`data-{0000..0009}.tar`, or a folder) is accepted wherever a recipe is: it is a one-source recipe whose images
resolve against the file's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from mllm.fingerprint import file_fingerprint

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".tar")
_SAMPLE_RE = re.compile(r"^(all|\d+|random:\d+|\d+(\.\d+)?%)$")


@dataclass
class SourceSpec:
    """One data source of a recipe."""

    path: str
    """Data file, folder (HF `save_to_disk`, Parquet folder) or webdataset shard pattern; relative to the recipe."""
    format: str = "auto"
    """Source format from the `mllm.data.sources` registry; `auto` detects it from the file."""
    sample: str | int = "all"
    """`all`, `N` (the first N), `random:N` (N drawn with the dataset seed) or `P%` (the first P percent)."""
    weight: float | None = None
    """Relative sampling weight in the mixture. Omitted on every source = plain concatenation."""
    name: str = ""
    """Short name used in reports (default: the file name)."""
    image_root: str | None = None
    """Overrides the recipe's image_root for this source."""
    image_column: str | None = None
    """Caption pairs / tables: the image column (default: the first of image, images, image_path, file_name, path, jpg, png)."""
    text_column: str | None = None
    """Caption pairs / tables: the caption column (default: the first of caption, text, txt, alt_text, sentence)."""
    prompt: str = "<image>"
    """Caption pairs: the user turn the caption answers (the `plain` template keeps only its images)."""
    split: str = "train"
    """HF datasets saved as a DatasetDict: which split."""

    def __post_init__(self):
        self.sample = str(self.sample).strip()
        if not _SAMPLE_RE.match(self.sample):
            raise ValueError(
                f"source {self.path}: sample must be all | N | random:N | P%, got {self.sample!r}"
            )
        if self.sample.endswith("%") and not 0 < float(self.sample[:-1]) <= 100:
            raise ValueError(
                f"source {self.path}: sample percentage must be in (0, 100], got {self.sample!r}"
            )
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"source {self.path}: weight must be > 0, got {self.weight}")
        if not self.name:
            self.name = os.path.basename(self.path.rstrip("/")) or self.path


@dataclass
class Recipe:
    """What to train on and how to turn it into token ids."""

    name: str = "data"
    image_root: str = "."
    """Folder image paths in the data resolve against (relative = against the recipe's folder). Paths may not escape it."""
    template: str = "auto"
    """`auto` = the LLM tokenizer's own chat_template; or a built-in: plain, vicuna_v1, chatml, llama3."""
    max_length: int | None = 2048
    """Token limit per sample after image expansion; longer samples are truncated (never inside an image)."""
    sources: list[SourceSpec] = field(default_factory=list)
    on_bad_sample: Literal["error", "skip"] = "error"
    """`error`: stop at the first bad sample with its location; `skip`: log it, record it, go on."""
    system_prompt: str | None = None
    """Added as the system message of conversations that have none."""
    max_image_pixels: int = 89_478_485
    """Images whose declared width × height exceeds this are bad samples (decompression-bomb guard)."""
    cache_dir: str | None = None
    """Where token-length caches go (default: $XDG_CACHE_HOME/mllm or ~/.cache/mllm); `none` disables."""
    path: str = ""
    """The recipe file this came from (set by load_recipe)."""

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceSpec) else _source_from_dict(s) for s in self.sources]
        if not self.sources:
            raise ValueError(f"recipe {self.name!r}: needs at least one entry under `sources`")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(
                f"recipe {self.name!r}: on_bad_sample must be error|skip, got {self.on_bad_sample!r}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"recipe {self.name!r}: max_length must be >= 1 or null, got {self.max_length}")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError(f"recipe {self.name!r}: give `weight` on every source or on none")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(
                f"recipe {self.name!r}: source names must be unique, got {names}; set `name:` on each"
            )

    def image_root_of(self, spec: SourceSpec) -> str:
        """Where `spec`'s relative image paths start: the source's own image_root, else the recipe's."""
        return spec.image_root or self.image_root

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _source_from_dict(data: Any) -> SourceSpec:
    if isinstance(data, str):
        return SourceSpec(path=data)
    if not isinstance(data, dict):
        raise ValueError(f"each entry of `sources` must be a mapping or a path, got {data!r}")
    known = {f.name for f in dataclasses.fields(SourceSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown source keys {unknown} in {data!r}; known: {sorted(known)}")
    if "path" not in data:
        raise ValueError(f"source {data!r} has no `path`")
    return SourceSpec(**data)


def _resolve(base: str, path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) or "://" in path else os.path.normpath(os.path.join(base, path))


def load_recipe(path: str, **overrides: Any) -> Recipe:
    """Read a recipe YAML (or treat a bare data file as a one-source recipe); `overrides` replace top-level keys."""
    from mllm.data.sources.webdataset import is_webdataset  # the sources read recipes: imported late

    path = os.fspath(path)
    shards = is_webdataset(path)  # a shard pattern (`data-{0000..0009}.tar`) names no one file
    if not os.path.exists(path) and not shards:
        raise FileNotFoundError(f"data recipe or file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith((".yaml", ".yml")):
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    elif path.endswith(DATA_FILE_SUFFIXES) or os.path.isdir(path) or shards:
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        data = {"name": stem, "image_root": ".", "sources": [{"path": os.path.basename(path.rstrip("/"))}]}
    else:
        raise ValueError(
            f"{path}: expected a recipe (.yaml) or a data file ({', '.join(DATA_FILE_SUFFIXES)})"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "image_root" in overrides:  # given on a command line: relative to where the user is, not to the recipe
        overrides["image_root"] = os.path.abspath(os.path.expanduser(str(overrides["image_root"])))
    data.update(overrides)
    known = {f.name for f in dataclasses.fields(Recipe)} - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {unknown}; known: {sorted(known)}")
    recipe = Recipe(**data, path=os.path.abspath(path))
    recipe.image_root = _resolve(base, str(recipe.image_root))
    for s in recipe.sources:
        s.path = _resolve(base, s.path)
        if s.image_root is not None:
            s.image_root = _resolve(base, s.image_root)
    if recipe.cache_dir not in (None, "none"):
        recipe.cache_dir = _resolve(base, recipe.cache_dir)
    return recipe


def data_fingerprint(recipe: Recipe) -> str:
    """A hash of what the recipe feeds a run: its data files' content and each source's selection settings.

    Paths do not count (moved data is the same data; a file rewritten in place is not). Images are not read:
    they are named by the records, which are. Each file counts as `mllm.fingerprint.file_fingerprint` sees it
    (a large file by its size and sampled blocks).
    """
    # Imported here: mllm.data.sources imports this module (SourceSpec), so a top-level import would be a cycle.
    from mllm.data.sources.webdataset import expand_shards, is_webdataset

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([recipe.template, recipe.max_length, recipe.system_prompt]).encode())
    for s in recipe.sources:
        settings = [s.format, s.sample, s.weight, s.image_column, s.text_column, s.prompt, s.split]
        h.update(json.dumps(settings).encode())
        for path in expand_shards(s.path) if is_webdataset(s.path) else [s.path]:
            h.update(file_fingerprint(path).encode())
    return h.hexdigest()
