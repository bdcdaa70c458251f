"""The interface of a data source: a sized, indexable collection of raw records, each turned into a `Sample`."""

from __future__ import annotations

from typing import Any

from mllm.data.recipe import SourceSpec
from mllm.data.sample import Sample


class Source:
    """Random-access source. Reading a record never touches images; `sample(i)` may raise BadSampleError."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.name = spec.name

    @classmethod
    def detect(cls, path: str, first: Any) -> bool:
        """Whether a file at `path` whose first record is `first` (None if unknown) is in this format."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def files(self) -> list[str]:
        """The files (or folder) the records are read from, for the length cache's fingerprint."""
        return [self.spec.path]

    def sample(self, index: int) -> Sample:
        """The normalised sample at `index` (BadSampleError for a malformed record)."""
        raise NotImplementedError

    def line(self, index: int) -> int | None:
        """1-based line in the file of record `index`, where the format has lines."""
        return None

    def raw_id(self, index: int) -> str | None:
        """The record's own id, for error messages, without normalising it (None if unreadable)."""
        return None


class RecordFileSource(Source):
    """A source read from a record file (JSON, JSONL or CSV rows in `self.records`): length, line numbers and raw
    ids come from the records; subclasses say how a record becomes a `Sample`."""

    records: Any

    def __len__(self) -> int:
        return len(self.records)

    def line(self, index: int) -> int | None:
        return self.records.line(index)

    def raw_id(self, index: int) -> str | None:
        return self.records.raw_id(index)
