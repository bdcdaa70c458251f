"""Pre-flight validation of a recipe: read every sample (parallel), open every image, report what is wrong.

Used by `mllm data check`; the same checks run lazily during training.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mllm.data.dataset import recipe_tasks
from mllm.data.layout import ImageLayout
from mllm.data.reader import as_layout, open_reader
from mllm.data.recipe import Recipe
from mllm.data.scan import scan
from mllm.data.sources import source_format


@dataclass
class SourceReport:
    name: str
    format: str
    selected: int = 0
    ok: int = 0
    bad: int = 0
    truncated: int = 0
    with_images: int = 0
    text_only: int = 0


@dataclass
class CheckReport:
    recipe: str
    image_tokens: str
    """How images become tokens: one count per image, or the layout's aspect and per-tile count."""
    max_length: int | None
    sources: list[SourceReport]
    lengths: np.ndarray
    """Exact token lengths of the good samples (after image expansion and truncation)."""
    full_lengths: np.ndarray
    """Their lengths before truncation."""
    bad: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s.selected for s in self.sources)

    def bad_kinds(self) -> Counter:
        return Counter(b["kind"] for b in self.bad)

    def histogram(self, bins: int = 12) -> list[tuple[int, int, int]]:
        """(low, high, count) buckets of the token lengths."""
        if not len(self.lengths):
            return []
        counts, edges = np.histogram(self.lengths, bins=min(bins, max(1, len(np.unique(self.lengths)))))
        return [(int(edges[i]), int(edges[i + 1]), int(c)) for i, c in enumerate(counts)]

    def format(self) -> str:
        lines = [
            f"recipe {self.recipe}: {self.total} samples, {len(self.bad)} bad "
            f"(image tokens per image: {self.image_tokens}, max_length: {self.max_length})",
            "",
        ]
        lines.append(
            f"{'source':<32} {'format':<10} {'samples':>8} {'ok':>8} {'bad':>6} {'images':>8} {'text':>7} {'trunc':>6}"
        )
        for s in self.sources:
            lines.append(
                f"{s.name[:32]:<32} {s.format:<10} {s.selected:>8} {s.ok:>8} {s.bad:>6} "
                f"{s.with_images:>8} {s.text_only:>7} {s.truncated:>6}"
            )
        if self.bad:
            lines += ["", "bad samples by reason:"]
            lines += [f"  {kind:<24} {n}" for kind, n in self.bad_kinds().most_common()]
            lines += ["", "first bad samples:"]
            for b in self.bad[:5]:
                where = f"line {b['line']}" if b.get("line") is not None else f"index {b['index']}"
                lines.append(f"  {b['source']} {where} id={b['id']!r}: [{b['kind']}] {b['reason']}")
        if len(self.lengths):
            p = np.percentile(self.lengths, [50, 90, 99])
            lines += [
                "",
                f"token lengths (images expanded): min {self.lengths.min()}  p50 {p[0]:.0f}  "
                f"p90 {p[1]:.0f}  p99 {p[2]:.0f}  max {self.lengths.max()}",
            ]
            over = int((self.full_lengths > self.lengths).sum())
            if over:
                lines.append(
                    f"  {over} sample(s) longer than max_length={self.max_length} are truncated "
                    f"(longest: {int(self.full_lengths.max())} tokens)"
                )
            hist = self.histogram()
            top = max(c for _, _, c in hist) or 1
            for lo, hi, c in hist:
                lines.append(f"  {lo:>7}-{hi:<7} {c:>8}  {'#' * max(1 if c else 0, round(40 * c / top))}")
        return "\n".join(lines)


def check_recipe(
    recipe: Recipe,
    tokenizer,
    image_tokens: int | ImageLayout,
    *,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Read every selected sample and open every image it references; nothing is skipped silently."""
    formats = [source_format(spec) for spec in recipe.sources]
    reader = open_reader(recipe, tokenizer, image_tokens)
    res = scan(
        reader,
        recipe_tasks(reader, seed),
        check_images=True,
        workers=workers,
        progress=progress,
        desc=f"checking {recipe.name}",
    )
    reports = [SourceReport(spec.name, fmt) for spec, fmt in zip(recipe.sources, formats, strict=True)]
    good = res.length >= 0
    for k, si in enumerate(res.source.tolist()):
        r = reports[si]
        r.selected += 1
        if not good[k]:
            r.bad += 1
            continue
        r.ok += 1
        r.truncated += int(res.full_length[k] > res.length[k])
        if res.has_image[k]:
            r.with_images += 1
        else:
            r.text_only += 1
    bad = [res.bad[k] for k in sorted(res.bad)]
    layout = as_layout(image_tokens)
    described = (
        str(layout.tile_tokens)
        if not layout.varies
        else f"{layout.aspect}, {layout.tile_tokens} per tile, exact per image from its size"
    )
    return CheckReport(
        recipe.name, described, recipe.max_length, reports, res.length[good], res.full_length[good], bad
    )


def write_bad_samples(report: CheckReport, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for b in report.bad:
            f.write(json.dumps(b) + "\n")
