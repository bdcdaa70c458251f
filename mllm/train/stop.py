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


def defer_stop_signals(_worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: a worker ignores SIGTERM and leaves stopping to its training process.

    Schedulers (Slurm, Kubernetes) signal every process of a job at once. A worker that ended on SIGTERM, at
    once or after a grace period, would make torch raise "DataLoader worker ... exited unexpectedly" in the
    training process wherever it is, even in the middle of the checkpoint that the same SIGTERM asked for.
    The training process got the signal too (or a peer rank did, and tells it): it saves, then shuts its
    workers down through their queues. A worker whose training process died still ends by itself: torch's
    worker loop checks that its parent lives every few seconds.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_code(summary: dict[str, Any]) -> int:
    """0 for a finished run; STOPPED_EXIT_CODE for one stopped on request (its checkpoint is complete)."""
    return STOPPED_EXIT_CODE if summary.get("stopped_by") else 0
