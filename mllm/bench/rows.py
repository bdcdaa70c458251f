"""The bench's rows: which stage and LLM mode both sides train, and the speed target each row must reach."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One comparison: both sides train the same parts of the model on the same stage's data."""

    name: str
    stage: int
    """1: caption data (pretrain.json); 2: instruction data (instruct.json)."""
    llm_mode: str
    """The LLM's training mode on both sides: frozen (connector only), full, or lora (same r, alpha, targets)."""
    target: float
    """mllm / reference samples/s this row must reach (median over the rounds)."""
    lr: float
    description: str


ROWS: dict[str, Row] = {
    "stage1": Row("stage1", 1, "frozen", 2.0, 1e-3, "stage 1: connector only, LLM and tower frozen"),
    "full": Row("full", 2, "full", 1.5, 2e-5, "stage 2: connector + full LLM"),
    "lora": Row("lora", 2, "lora", 1.5, 2e-5, "stage 2: connector + LoRA on the LLM (mllm's LoRA defaults)"),
}

RSS_TARGET = 0.9
"""Peak RSS of mllm / reference (main processes) every row must stay at or under."""


def get_row(name: str) -> Row:
    if name not in ROWS:
        raise ValueError(f"unknown bench row {name!r}; known: {', '.join(ROWS)}")
    return ROWS[name]
