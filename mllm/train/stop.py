"""Stopping on request: SIGTERM (what schedulers send before preemption) ends the run at the next step
boundary with a checkpoint, instead of killing it mid-step and losing everything since the last save."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM,)
STOPPED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status of a run stopped by SIGTERM after saving (the shell's convention for "terminated"), so that
wrappers and schedulers see it did not finish, and can start it again to continue."""


class StopRequest:
    """While active (`with`), SIGTERM sets `signal` instead of killing the process; the loop polls `requested`.

    Only the main thread may install signal handlers: elsewhere (a run started from a worker thread) this does
    nothing and SIGTERM keeps its default action.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            log.warning(
                "received %s: stopping after this step with a checkpoint", signal.Signals(signum).name
            )
        self.signal = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


WORKER_GRACE_S = 15
"""After SIGTERM a DataLoader worker keeps serving this long: the step under way may still need its batches."""


def defer_stop_signals(_worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`. Schedulers signal every process of a job at once; a worker that died at once
    would fail the step under way (torch raises in the training process wherever it is, even mid-update). So
    a worker answers SIGTERM by ending WORKER_GRACE_S seconds later, or sooner when its training process
    closes the loader after saving."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _end_after_grace)


def _end_after_grace(signum, frame) -> None:
    signal.alarm(WORKER_GRACE_S)  # SIGALRM's default action ends the process


def exit_code(summary: dict[str, Any]) -> int:
    """0 for a finished run; STOPPED_EXIT_CODE for one stopped on request (its checkpoint is complete)."""
    return STOPPED_EXIT_CODE if summary.get("stopped_by") else 0
