"""Parameter groups (the connector may have its own learning rate) and the warm-up + decay schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mllm.train.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters split into connector and the rest, each group with its peak lr."""
    connector = [p for p in model.connector.parameters() if p.requires_grad]
    ids = {id(p) for p in connector}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    connector_lr = cfg.connector_lr or cfg.lr
    groups = [{"params": connector, "lr": connector_lr, "name": "connector"}]
    if rest:
        groups.append({"params": rest, "lr": cfg.lr, "name": "llm+vision"})
    if not connector and not rest:
        raise ValueError("nothing to train: every parameter is frozen")
    return groups


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """Factor on the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine/linear/constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg.schedule)
    )


def schedule_from(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put every parameter group on this run's schedule at `step` (optimizer steps done), after a restore.

    A restored scheduler holds the learning rate its previous run computed; if --max-steps or --epochs changed,
    that belongs to another schedule (at the end of a cosine run: 0). Recomputing it from this run's lambda makes
    a resumed run follow a fresh schedule of its new length from the restored step.
    """
    scheduler.last_epoch = step - 1
    scheduler.step()  # sets each group's lr to base_lr × multiplier(step) and get_last_lr() to match
