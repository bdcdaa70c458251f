"""Non-finite training steps: which quantity made a step skip, the log line, the consecutive-skip stop, and the
test hook that makes a step non-finite on purpose.

A step whose loss or gradient norm is NaN or infinite on any rank is skipped on every rank in that same step:
no parameter, optimizer-state or learning-rate-schedule change (how: `mllm.train.distributed.backward` and
`step_applied`). The run goes on with the next batch; after `max_skipped_steps` skipped steps in a row it stops,
saving nothing: its weights never took a non-finite step, and the last checkpoint stays the newest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

FAULT_ENV = "MLLM_FAULT_NONFINITE"
"""Test hook: `KIND:STEP[,STEP...][@RANK]` makes the loss (`loss`) or only its gradient (`grad`) non-finite at
those optimizer steps (1-based), on one rank or, without `@RANK`, on all. E.g. `loss:3`, `grad:2,3@1`."""
STOPPED = "non-finite steps"
"""The `stopped_by` of a run's summary when consecutive non-finite steps stopped it."""


class NonFiniteTraining(RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, or an engine that cannot skip one."""


@dataclass(frozen=True)
class Fault:
    """A non-finite value injected on purpose (from `FAULT_ENV`), to test the skip without a diverging run."""

    kind: str
    steps: frozenset[int]
    rank: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Fault | None:
        """The fault `FAULT_ENV` describes, or None when it is unset."""
        text = environ.get(FAULT_ENV, "").strip()
        if not text:
            return None
        try:
            kind, _, rest = text.partition(":")
            steps, _, rank = rest.partition("@")
            fault = cls(kind, frozenset(int(s) for s in steps.split(",")), int(rank) if rank else None)
        except ValueError:
            fault = None
        if fault is None or fault.kind not in ("loss", "grad"):
            raise ValueError(
                f"{FAULT_ENV}={text!r}: expected KIND:STEP[,STEP...][@RANK] with KIND loss or grad"
            )
        return fault

    def apply(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """`loss`, made non-finite (`loss`: its value, its gradient stays finite; `grad`: its gradient only) when
        this step and rank are the fault's."""
        if step not in self.steps or self.rank not in (None, rank):
            return loss
        if self.kind == "loss":
            return loss + float("nan")
        poisoned = loss.clone()
        poisoned.register_hook(lambda grad: grad * float("nan"))
        return poisoned


def skip_reason(loss_nonfinite: bool, step_discarded: bool) -> str | None:
    """What made the step skip (`loss`, `gradient norm`), or None for a step that was applied.

    Both flags are the same on every rank (all-reduced). A non-finite loss whose step was applied anyway means
    the engine cannot discard a step: the weights are now suspect, so the run stops here.
    """
    if step_discarded:
        return "loss" if loss_nonfinite else "gradient norm"
    if loss_nonfinite:
        raise NonFiniteTraining(
            "the loss was not finite, yet the optimizer applied the step: this DeepSpeed config does not discard "
            "non-finite steps (ZeRO stage 0, or bf16.check_grad_overflow false); use zero_configs/z2.json or z3.json"
        )
    return None


@dataclass
class Skips:
    """Counts skipped steps; `exhausted` after `limit` of them in a row."""

    limit: int
    in_a_row: list[int] = field(default_factory=list)

    def update(self, step: int, reason: str | None, sample_ids: list[list[str]], rank: int) -> None:
        """Note step `step`'s outcome; a skipped step is logged (every rank logs the samples it trained on)."""
        if reason is None:
            self.in_a_row.clear()
            return
        self.in_a_row.append(step)
        log.warning(
            "step %d: non-finite %s (detected on every rank); the optimizer step was skipped (weights, optimizer "
            "state and lr schedule unchanged; %d in a row, the run stops at %d). Rank %d's micro-batches held "
            "samples %s",
            step, reason, len(self.in_a_row), self.limit, rank, sample_ids,
        )  # fmt: skip

    @property
    def exhausted(self) -> bool:
        return len(self.in_a_row) >= self.limit

    def message(self, last_checkpoint) -> str:
        steps = self.in_a_row
        return (
            f"stopped: {len(steps)} optimizer steps in a row (steps {steps[0]}-{steps[-1]}) had a non-finite loss or "
            f"gradient norm and were skipped (each is logged above with its samples); nothing was saved after "
            f"them, the newest checkpoint is {last_checkpoint or 'none (no checkpoint was written yet)'}. "
            "Lower --lr, check those samples, or raise --max-skipped-steps"
        )
