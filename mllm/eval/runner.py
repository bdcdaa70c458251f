"""Run a checkpoint over evaluation items in batches and score the answers (QA accuracy or caption metrics)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from mllm.data.errors import BadSampleError
from mllm.data.images import open_image
from mllm.eval.data import EvalItem
from mllm.eval.metrics import caption_scores, qa_scores
from mllm.inference.generate import batched, generate_batch
from mllm.inference.processor import Conversation

log = logging.getLogger(__name__)

CAPTION_MIN_WORDS = 5.0
"""`--metric auto` scores as captions when references average at least this many words, else as QA."""


def detect_metric(items: list[EvalItem]) -> str:
    mean_words = sum(len(it.reference.split()) for it in items) / max(len(items), 1)
    metric = "caption" if mean_words >= CAPTION_MIN_WORDS else "qa"
    log.info("metric: %s (references average %.1f words; pass --metric to choose)", metric, mean_words)
    return metric


def predict(
    model, processor, items: list[EvalItem], sampling, batch_size: int = 8, progress: bool = True
) -> list[str]:
    """Greedy (or sampled) answers for every item, batch by batch, with a progress bar."""
    answers: list[str] = []
    with tqdm(total=len(items), desc="evaluating", unit="sample", disable=not progress) as bar:
        for chunk in batched(items, batch_size):
            convs = []
            for it in chunk:
                try:
                    images = [open_image(ref, it.image_root, it.max_image_pixels) for ref in it.images]
                    processor.layout.token_counts(
                        [im.size for im in images]
                    )  # the image budgets, as in training
                except BadSampleError as e:
                    raise ValueError(f"sample {it.id}: {e}") from None
                convs.append(Conversation(it.messages, images))
            answers.extend(generate_batch(model, processor, convs, sampling))
            bar.update(len(chunk))
    return answers


def score(items: list[EvalItem], predictions: list[str], metric: str) -> dict:
    """QA accuracy (overall, per type); for captions also BLEU-4 / ROUGE-L / CIDEr."""
    if metric not in ("qa", "caption"):
        raise ValueError(f"metric must be qa|caption, got {metric!r}")
    refs = [it.reference for it in items]
    scores = qa_scores(predictions, refs, [it.type for it in items])
    if metric == "caption":
        scores.update(caption_scores(predictions, refs))
    return scores


def prediction_records(items: list[EvalItem], predictions: list[str]) -> list[dict]:
    rows = []
    for it, pred in zip(items, predictions, strict=True):
        question = next((m["content"] for m in reversed(it.messages) if m["role"] == "user"), "")
        row = {
            "id": it.id,
            "question": question,
            "prediction": pred,
            "reference": it.reference,
            "type": it.type,
        }
        row["images"] = it.image_paths()
        if it.own_images is not None:
            row["own_images"] = it.own_images
        rows.append(row)
    return rows


def write_results(out_dir: str | os.PathLike, records: list[dict], scores: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds, score_file = out / "predictions.jsonl", out / "scores.json"
    with open(preds, "w", encoding="utf-8") as f:
        for row in records:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    score_file.write_text(json.dumps(scores, indent=2))
    return preds, score_file


def format_scores(scores: dict) -> str:
    """A small table: overall, then one line per question type."""
    lines = [f"{'':<16} {'n':>6} {'exact':>8} {'vqa acc':>8}"]
    rows = [("overall", scores)] + list(scores.get("per_type", {}).items())
    for name, s in rows:
        lines.append(f"{name:<16} {s['n']:>6} {s['exact_match']:>7.2f}% {s['vqa_accuracy']:>7.2f}%")
    if "bleu4" in scores:
        lines.append(
            f"BLEU-4 {scores['bleu4']:.4f}  ROUGE-L {scores['rouge_l']:.4f}  CIDEr {scores['cider']:.4f}"
        )
    return "\n".join(lines)
