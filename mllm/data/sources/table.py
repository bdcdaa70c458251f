"""Arrow tables: Parquet files (or a folder of them) and Hugging Face `datasets` saved with `save_to_disk`.

Rows may hold LLaVA `conversations`, OpenAI `messages`, or a caption; the
image column may hold paths, bytes, or HF `Image` values (read undecoded,
so reading a row never decodes its image). Both stay memory-mapped.
"""

from __future__ import annotations

# `datasets` / `pyarrow` are imported where a Parquet or HF source is opened: importing them costs seconds
# that recipes of JSON sources never need.
import glob
import os
from typing import Any

from mllm.data.recipe import SourceSpec
from mllm.data.sample import Sample
from mllm.data.sources.base import Source
from mllm.data.sources.captions import IMAGE_COLUMNS, TEXT_COLUMNS, caption_sample, pick_column
from mllm.data.sources.llava import conversations_sample
from mllm.data.sources.messages import messages_sample


class TableSource(Source):
    """Row access over something indexable by int that returns dicts (a `datasets.Dataset`)."""

    def __init__(self, spec: SourceSpec, rows, columns: list[str]):
        super().__init__(spec)
        self.rows = rows
        self.columns = columns
        if "conversations" in columns:
            self.kind = "conversations"
        elif "messages" in columns:
            self.kind = "messages"
        else:
            self.kind = "caption"
            self.image_col = pick_column(columns, spec.image_column, IMAGE_COLUMNS, "image", spec.path)
            self.text_col = pick_column(columns, spec.text_column, TEXT_COLUMNS, "text", spec.path)

    def __len__(self) -> int:
        return len(self.rows)

    def raw_id(self, index: int) -> str | None:
        rid = self.rows[index].get("id") if "id" in self.columns else None
        return None if rid is None else str(rid)

    def sample(self, index: int) -> Sample:
        row: dict[str, Any] = self.rows[index]
        fallback = f"{self.name}:{index}"
        if self.kind == "conversations":
            return conversations_sample(row, fallback)
        if self.kind == "messages":
            return messages_sample(row, fallback)
        return caption_sample(row, fallback, self.image_col, self.text_col, self.spec.prompt)


def _undecoded(ds):
    """Image columns as {bytes, path} instead of decoded PIL images (decode only when the sample is used)."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds


def parquet_files(path: str) -> list[str]:
    return (
        sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if os.path.isdir(path)
        else [path]
    )


class ParquetSource(TableSource):
    def __init__(self, spec: SourceSpec):
        import datasets
        import pyarrow.parquet as pq

        files = parquet_files(spec.path)
        if not files:
            raise FileNotFoundError(f"data source {spec.name!r}: no .parquet files under {spec.path}")
        table = pq.read_table(files, memory_map=True) if len(files) == 1 else pq.ParquetDataset(files).read()
        # a Dataset over the in-memory Arrow table: no cache files written, HF feature types honoured
        ds = _undecoded(datasets.Dataset(table))
        super().__init__(spec, ds, list(ds.column_names))

    @classmethod
    def detect(cls, path: str, first: Any) -> bool:
        if path.endswith(".parquet"):
            return True
        return os.path.isdir(path) and not _is_saved_dataset(path) and bool(parquet_files(path))


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


class HFDiskSource(TableSource):
    def __init__(self, spec: SourceSpec):
        import datasets

        ds = datasets.load_from_disk(spec.path)
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ValueError(
                    f"{spec.path}: no split {spec.split!r}; splits are {sorted(ds)}; set `split:`"
                )
            ds = ds[spec.split]
        ds = _undecoded(ds)
        super().__init__(spec, ds, list(ds.column_names))

    @classmethod
    def detect(cls, path: str, first: Any) -> bool:
        return os.path.isdir(path) and _is_saved_dataset(path)
