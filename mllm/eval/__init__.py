"""Evaluation: answer normalisation, metrics, and running a checkpoint over a question-answer or caption set."""

from mllm.eval.metrics import caption_scores, exact_match, qa_scores, vqa_accuracy
from mllm.eval.normalize import normalize_answer

__all__ = ["caption_scores", "exact_match", "normalize_answer", "qa_scores", "vqa_accuracy"]
