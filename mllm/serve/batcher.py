"""Dynamic batching: requests that arrive together are answered by one `generate_batch` call, on one worker thread.

The queue is bounded: a request that finds it full is refused at once (`QueueFull`, HTTP 429) instead of waiting
without limit. Every request gets its answer as it is generated, row by row (`RowStreamer`), so streamed and
plain requests share batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from mllm.inference import Conversation, SamplingConfig, generate_batch
from mllm.inference.generate import cut_at_stop, stop_token_ids

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue holds as many requests as it may; the message says how many."""


class Closed(Exception):
    """The batcher is shutting down (or its worker died) and takes no more requests."""


@dataclass
class Job:
    """One request: its conversation, how to sample, and where its events go (an asyncio queue on `loop`)."""

    conversation: Conversation
    sampling: SamplingConfig
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    prompt_tokens: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """("delta", text) while answering, then ("done", answer, finish_reason, completion_tokens) or ("error", msg)."""
    sent: str = ""
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    """A stop token was generated: later ids in this row are padding."""

    def key(self) -> tuple:
        """Jobs with equal keys can share a batch: same sampling; a seeded job runs alone (its seed sets the RNG)."""
        if self.seed is not None and self.sampling.temperature > 0:
            return ("seeded", id(self))
        s = self.sampling
        return (s.max_new_tokens, s.temperature, s.top_p if s.temperature > 0 else None)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters might still become a stop string (or trailing space the answer drops)."""
    hold = len(text) - len(text.rstrip())
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class RowStreamer(BaseStreamer):
    """Decodes each row of a generating batch as it grows and hands every job the new text of its row."""

    def __init__(self, jobs: list[Job], tokenizer, stop_ids: list[int]):
        self.jobs, self.tokenizer, self.stop_ids = jobs, tokenizer, set(stop_ids)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call passes the prompt ids
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist(), strict=True):
            if job.finished:
                continue
            if token in self.stop_ids:
                job.finished = True
                continue
            job.tokens.append(token)
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True).lstrip()
            text, stopped = cut_at_stop(text, job.stop)
            if text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
                continue
            ready = text if stopped else text[: len(text) - _held_back(text, job.stop)]
            if len(ready) > len(job.sent) and ready.startswith(job.sent):
                job.emit("delta", ready[len(job.sent) :])
                job.sent = ready

    def end(self) -> None:
        pass


class Batcher:
    """Collects jobs into batches of up to `max_batch` and answers them on one worker thread.

    A batch starts as soon as the worker is free; when it is idle it first waits `wait_s` for companions.
    At most `max_queue` jobs wait at any time; more are refused with `QueueFull`.
    """

    def __init__(self, model, processor, max_batch: int = 8, max_queue: int = 64, wait_s: float = 0.01):
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue, self.wait_s = max_batch, max_queue, wait_s
        self.stop_ids = stop_token_ids(model, processor)
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()
        """How many batches of each size were run (for /health and the load report)."""
        self.running = 0
        self._thread = threading.Thread(target=self._work, name="mllm-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise `QueueFull` / `Closed` at once."""
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise Closed("the server is shutting down and takes no new requests")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"the request queue is full ({self.max_queue} waiting, batches of up to {self.max_batch}); "
                    "retry in a moment"
                )
            self._pending.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.emit("error", 503, "the server is shutting down")
            self._pending.clear()
            self._cond.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.wait_s
            key = self._pending[0].key()
            while (
                sum(j.key() == key for j in self._pending) < self.max_batch
                and (left := deadline - time.monotonic()) > 0
            ):
                self._cond.wait(left)
            batch = [j for j in self._pending if j.key() == key][: self.max_batch]
            self._pending = [j for j in self._pending if j not in batch]
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.batch_sizes[len(batch)] += 1
            self.running = len(batch)
            try:
                self._answer(batch)
            except Exception as e:  # one bad batch fails its own requests; the server keeps serving
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.running = 0

    def _answer(self, batch: list[Job]) -> None:
        first = batch[0]
        if first.seed is not None and first.sampling.temperature > 0:
            torch.manual_seed(first.seed)
        streamer = RowStreamer(batch, self.processor.tokenizer, self.stop_ids)
        answers = generate_batch(
            self.model, self.processor, [j.conversation for j in batch], first.sampling, streamer
        )
        for job, answer in zip(batch, answers, strict=True):
            answer, stopped = cut_at_stop(answer, job.stop)
            if answer.startswith(job.sent):  # the held-back tail (or everything, if nothing was streamed)
                if answer[len(job.sent) :]:
                    job.emit("delta", answer[len(job.sent) :])
            ran_out = not (stopped or job.finished) and len(job.tokens) >= job.sampling.max_new_tokens
            job.emit("done", answer, "length" if ran_out else "stop", len(job.tokens))
