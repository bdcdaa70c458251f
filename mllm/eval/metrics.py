"""Scores for predictions against references: exact match, VQA accuracy (per question type), BLEU-4 / ROUGE-L / CIDEr."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence

from mllm.eval.normalize import normalize_answer


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the stripped strings are identical (case-sensitive), else 0.0."""
    return float(prediction.strip() == reference.strip())


def vqa_accuracy(prediction: str, references: str | Sequence[str]) -> float:
    """VQA accuracy after normalisation: min(#references that match / 3, 1); one reference → 0 or 1."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(prediction)
    hits = sum(normalize_answer(r) == pred for r in refs)
    return float(hits > 0) if len(refs) == 1 else min(hits / 3.0, 1.0)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (z = 1.96: 95%) of a rate `successes / n`, as proportions in [0, 1].

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0% or 100%."""
    if n <= 0:
        raise ValueError(f"an interval needs n >= 1 trials, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..n={n}, got {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def qa_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    types: Sequence[str | None] | None = None,
) -> dict:
    """Exact match and VQA accuracy (percent) overall and, when samples carry a type, per type."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    types = list(types) if types is not None else [None] * len(predictions)
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for pred, ref, kind in zip(predictions, references, types, strict=True):
        first = ref if isinstance(ref, str) else ref[0]
        row = (exact_match(pred, first), vqa_accuracy(pred, ref))
        groups["overall"].append(row)
        if kind is not None:
            groups[str(kind)].append(row)

    def summary(rows):
        n = len(rows)
        return {
            "n": n,
            "exact_match": 100.0 * sum(r[0] for r in rows) / max(n, 1),
            "vqa_accuracy": 100.0 * sum(r[1] for r in rows) / max(n, 1),
        }

    out = summary(groups.pop("overall", []))
    if groups:
        out["per_type"] = {kind: summary(rows) for kind, rows in sorted(groups.items())}
    return out


def _caption_tokens(text: str) -> str:
    """Lower-case words without punctuation: the PTB tokenizer's effect, without its Java dependency."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """BLEU-4, ROUGE-L and CIDEr (pycocoevalcap; CIDEr's IDF comes from these references)."""
    # optional dependency (the demo extra), needed by caption scores only
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    res = {i: [_caption_tokens(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {
        i: [_caption_tokens(r) for r in ([ref] if isinstance(ref, str) else ref)]
        for i, ref in enumerate(references)
    }
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"n": len(predictions), "bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}
