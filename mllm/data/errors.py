"""Bad-sample errors: every one names where the sample is (source, index or line, id) and what is wrong with it."""

from __future__ import annotations

import ast
import re
from typing import Any

_MESSAGE = re.compile(
    r"bad sample(?: \((?P<where>.*?)\))?: \[(?P<kind>[a-z_]+)\] (?P<reason>.*?)(?: \(record index (?P<rindex>\d+)\))?\Z",
    re.S,
)
_WHERE = re.compile(
    r"\A(?:source (?P<source>.*?))?(?:(?:, )?line (?P<line>\d+))?(?:(?:, )?index (?P<index>\d+))?"
    r"(?:(?:, )?id (?P<id>.*))?\Z",
    re.S,
)


class BadSampleError(ValueError):
    """One sample cannot be trained on. `kind` is a short stable code (e.g. `missing_image`), `reason` the detail.

    `BadSampleError(text)` with one argument rebuilds the error from its message: that is how torch's DataLoader
    re-raises an exception from a worker process (`type(e)(traceback_text)`), so a bad sample met in a worker
    still reaches the training loop as this error, with its location, instead of a RuntimeError and a traceback.
    """

    def __init__(
        self,
        kind: str,
        reason: str | None = None,
        *,
        source: str | None = None,
        index: int | None = None,
        line: int | None = None,
        sample_id: str | None = None,
    ):
        if reason is None:
            kind, reason, source, index, line, sample_id = _parse(kind)
        self.kind = kind
        self.reason = reason
        self.source = source
        self.index = index
        self.line = line
        self.sample_id = sample_id
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.source is not None:
            where.append(f"source {self.source}")
        if self.line is not None:
            where.append(f"line {self.line}")
        elif self.index is not None:
            where.append(f"index {self.index}")
        if self.sample_id is not None:
            where.append(f"id {self.sample_id!r}")
        prefix = f"bad sample ({', '.join(where)})" if where else "bad sample"
        # with a line number shown, the record index (what `sample:` and the dataset count) goes last
        suffix = f" (record index {self.index})" if self.line is not None and self.index is not None else ""
        return f"{prefix}: [{self.kind}] {self.reason}{suffix}"

    def __reduce__(self):
        return _rebuild, (self.record(),)

    def located(self, *, source: str, index: int, line: int | None, sample_id: str | None) -> BadSampleError:
        """The same error, now saying which sample it is."""
        return BadSampleError(
            self.kind,
            self.reason,
            source=source,
            index=index,
            line=line if line is not None else self.line,
            sample_id=sample_id if sample_id is not None else self.sample_id,
        )

    def record(self) -> dict[str, Any]:
        """One JSON-able line for the bad-sample report."""
        return {
            "source": self.source,
            "index": self.index,
            "line": self.line,
            "id": self.sample_id,
            "kind": self.kind,
            "reason": self.reason,
        }


def _rebuild(record: dict[str, Any]) -> BadSampleError:
    return BadSampleError(
        record["kind"],
        record["reason"],
        source=record["source"],
        index=record["index"],
        line=record["line"],
        sample_id=record["id"],
    )


def _parse(text: str):
    """(kind, reason, source, index, line, id) from a message, or from a traceback that ends with one."""
    message = text.rsplit("BadSampleError: ", 1)[-1].strip()
    m = _MESSAGE.match(message)
    if m is None:  # not one of ours: keep all of it as the reason
        return "unknown", message, None, None, None, None
    w = _WHERE.match(m["where"] or "")
    source = line = index = sample_id = None
    if w is not None:
        source = w["source"]
        line = int(w["line"]) if w["line"] else None
        index = int(w["index"]) if w["index"] else None
        if w["id"] is not None:
            try:
                sample_id = str(ast.literal_eval(w["id"]))
            except (ValueError, SyntaxError):
                sample_id = w["id"]
    if m["rindex"] is not None:
        index = int(m["rindex"])
    return m["kind"], m["reason"], source, index, line, sample_id
