"""What each side of the bench measures, the same way: step times after warm-up, tokens, padding, waits, peak RSS."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: its own high-water mark (VmHWM).

    Not `getrusage`'s ru_maxrss: Linux carries that across exec, so a side launched by a bigger parent (the bench
    after its matmul-peak measurement) would report the parent's footprint at fork as its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # not Linux: KiB on most, the best there is


def children_peak_rss_mb() -> float:
    """Largest peak RSS (VmHWM) among this process's live child processes (DataLoader workers), in MiB; 0 if none."""
    peak = 0.0
    for child in _children():
        try:
            with open(f"/proc/{child}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's live children (DataLoader workers)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for child in _children():
        try:
            with open(f"/proc/{child}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def _children() -> list[str]:
    pid = os.getpid()
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += f.read().split()
        except OSError:
            continue
    return out


@dataclass
class StepMeter:
    """Call `batch(...)` for each micro-batch and `step_end()` after each optimizer step.

    Steps up to `warmup` are run but not counted; the clock starts at the end of the last warm-up step,
    so the first timed step includes its data wait, exactly like every later one.
    """

    warmup: int
    measures_wait: bool = True
    """False where the loop's data wait cannot be observed (inside transformers.Trainer): reported as None."""
    steps: int = 0
    samples: int = 0
    real_tokens: int = 0
    slot_tokens: int = 0
    """Token slots the model computed on (padding included)."""
    supervised_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    data_wait_s: float = 0.0
    _pending: list = field(default_factory=list)
    _t0: float | None = None
    _t_end: float | None = None
    _cpu0: tuple[float, float] = (0.0, 0.0)
    _cpu_end: tuple[float, float] = (0.0, 0.0)
    losses: list[float] = field(default_factory=list)
    _created: float = field(default_factory=time.perf_counter)
    worker_peak_rss_mb: float = 0.0
    """Largest DataLoader-worker peak RSS seen at any step end (workers are gone by the time the run ends)."""

    def batch(
        self, lengths: list[int], images: list[int], slots: int, supervised: int, wait_s: float = 0.0
    ) -> None:
        self._pending.append((lengths, images, slots, supervised, wait_s))

    def step_end(self, loss: float | None = None) -> None:
        self.steps += 1
        self.worker_peak_rss_mb = max(self.worker_peak_rss_mb, children_peak_rss_mb())
        pending, self._pending = self._pending, []
        if self.steps <= self.warmup:
            self._t0 = time.perf_counter()
            self._cpu0 = (time.process_time(), children_cpu_s())
            return
        for lengths, images, slots, supervised, wait_s in pending:
            self.samples += len(lengths)
            self.real_tokens += sum(lengths)
            self.slot_tokens += slots
            self.supervised_tokens += supervised
            self.lengths += lengths
            self.images += images
            self.data_wait_s += wait_s
        if loss is not None:
            self.losses.append(float(loss))
        self._t_end = time.perf_counter()
        self._cpu_end = (time.process_time(), children_cpu_s())

    @property
    def timed_steps(self) -> int:
        return max(0, self.steps - self.warmup)

    def result(self) -> dict:
        if self._t0 is None or self._t_end is None or self.timed_steps == 0:
            raise RuntimeError(f"no timed steps: ran {self.steps} step(s) with warmup={self.warmup}")
        elapsed = self._t_end - self._t0
        return {
            "timed_steps": self.timed_steps,
            "warmup_wall_s": self._t0 - self._created,
            "elapsed_s": elapsed,
            "samples": self.samples,
            "samples_per_s": self.samples / elapsed,
            "real_tokens": self.real_tokens,
            "real_tokens_per_s": self.real_tokens / elapsed,
            "padding_share": 1 - self.real_tokens / max(self.slot_tokens, 1),
            "supervised_tokens": self.supervised_tokens,
            "data_wait_s": self.data_wait_s if self.measures_wait else None,
            "data_wait_share": self.data_wait_s / elapsed if self.measures_wait else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "worker_peak_rss_mb": self.worker_peak_rss_mb,
            # CPU seconds are robust to other processes sharing the cores (wall time is not): a second opinion
            "cpu_s": self._cpu_end[0] - self._cpu0[0],
            "worker_cpu_s": self._cpu_end[1] - self._cpu0[1],
            "samples_per_cpu_s": self.samples
            / max(self._cpu_end[0] - self._cpu0[0] + self._cpu_end[1] - self._cpu0[1], 1e-9),
            "lengths": self.lengths,
            "images": self.images,
        }
