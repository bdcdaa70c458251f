"""What a run reports: progress bar, metrics.jsonl, TensorBoard, loss/lr curve PNG and the end summary.

Only rank 0 reports; the other ranks get a `Progress` that does nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
ALIGNMENT_FILE = "mir.jsonl"
"""--mir-data: one line per measurement, {"step", "mir", "per_layer", "n_visual", "n_text"}."""
CURVE_FILE = "loss_lr.png"
SUMMARY_FILE = "summary.json"


class Progress:
    def __init__(
        self,
        output: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        log_every: int = 1,
        already_spent: float = 0.0,
    ):
        self.output, self.total, self.enabled, self.log_every = output, total_steps, enabled, log_every
        self.start_step = start_step
        self.started = time.perf_counter() - already_spent  # seconds the run spent before its first step
        self.last = time.perf_counter()
        self.samples = self.tokens = 0
        self.bar = None
        self.writer = None
        if not enabled:
            return
        _truncate_metrics(output / METRICS_FILE, start_step)
        if start_step:
            _truncate_metrics(output / ALIGNMENT_FILE, start_step)
        else:  # a fresh start (maybe --resume no over an old run) measures step 0 again
            (output / ALIGNMENT_FILE).unlink(missing_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # only when logging: its import costs seconds

        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        samples: int,
        tokens: int,
        epoch: float,
        skipped: str | None = None,
        skipped_steps: int = 0,
        parts: dict[str, float] | None = None,
    ) -> dict:
        """Record one step. `skipped`: what made it skip (`loss`, `gradient norm`) or None; `skipped_steps`: how many
        steps the run has skipped so far; `parts`: the loss's terms by name (stage 0: itc, itm, itg), logged as
        `loss_<name>`."""
        now = time.perf_counter()
        dt, self.last = max(now - self.last, 1e-9), now
        self.samples += samples
        self.tokens += tokens
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": samples / dt,
            "tokens_per_s": tokens / dt,
            "epoch": round(epoch, 4),
            "skipped": skipped,
            "skipped_steps": skipped_steps,
            **{f"loss_{name}": value for name, value in (parts or {}).items()},
            "rss_mb": round(
                psutil.Process().memory_info().rss / 2**20, 1
            ),  # this process; watch it for leaks
        }
        if not self.enabled:
            return record
        with open(self.output / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        terms = [f"loss_{name}" for name in parts or {}]
        for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", *terms):
            if record[key] is not None:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total:
            self.bar.set_postfix(
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                samples_s=f"{record['samples_per_s']:.1f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
        return record

    def alignment(self, step: int, scores: dict) -> None:
        """Record the Modality Integration Rate measured after `step` optimizer steps (0: before the first)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: scores[k] for k in ("mir", "per_layer", "n_visual", "n_text")}}
        with open(self.output / ALIGNMENT_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.add_scalar("alignment/mir", scores["mir"], step)
        self.bar.write(f"step {step}: MIR {scores['mir']:.3f}")

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Close the bar and writers, draw the curves, write and return the summary."""
        elapsed = time.perf_counter() - self.started
        summary = {
            "steps_this_run": extra.get("step", 0) - self.start_step,
            "seconds": round(elapsed, 2),
            "samples_per_s": self.samples / max(elapsed, 1e-9),
            "tokens_per_s": self.tokens / max(elapsed, 1e-9),
            **extra,
        }
        if not self.enabled:
            return summary
        self.bar.close()
        self.writer.close()
        records = read_metrics(self.output)
        if records:
            summary["first_loss"], summary["final_loss"] = records[0]["loss"], records[-1]["loss"]
            plot_curves(records, self.output / CURVE_FILE)
        (self.output / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        return summary


def read_metrics(output: Path) -> list[dict[str, Any]]:
    path = Path(output) / METRICS_FILE
    if not path.is_file():
        return []
    return [r for _, r in _records(path)]


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each whole line; a line torn by a crash mid-write is left out."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            continue
    return out


def _truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, forget steps after the checkpoint: they are about to be trained again."""
    if not path.is_file():
        return
    keep = [line for line, r in _records(path) if r["step"] <= start_step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    # imported at the end of a run only (seconds of import), with the file-only backend chosen before pyplot
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set_ylabel("loss")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_summary(summary: dict[str, Any]) -> str:
    keys = (
        "step",
        "steps_this_run",
        "seconds",
        "first_loss",
        "final_loss",
        "skipped_steps",
        "samples_per_s",
        "tokens_per_s",
        "checkpoint",
    )
    parts = []
    for k in keys:
        if k in summary and summary[k] is not None:
            v = summary[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "done: " + " ".join(parts)
