"""Bad-sample errors: every one names where the sample is (source, index or line, id) and what is wrong with it."""

from __future__ import annotations

from typing import Any


class BadSampleError(ValueError):
    """One sample cannot be trained on. `kind` is a short stable code (e.g. `missing_image`), `reason` the detail."""

    def __init__(
        self,
        kind: str,
        reason: str,
        *,
        source: str | None = None,
        index: int | None = None,
        line: int | None = None,
        sample_id: str | None = None,
    ):
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
        return f"{prefix}: [{self.kind}] {self.reason}"

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
