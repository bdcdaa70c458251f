"""The serve batcher's bounded queue, made to fill deterministically: the worker is held inside a batch while
requests wait, and the next request is refused at once with 429 and the 'queue is full' message."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from helpers import make_checkpoint, never_stop


class GatedProcessor:
    """The batcher's processor, holding each batch at a gate until the test opens it: a worker kept busy."""

    def __init__(self, processor):
        self.processor = processor
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, conversations):
        self.entered.set()
        if not self.gate.wait(timeout=120):
            raise TimeoutError("the test never opened the gate")
        return self.processor(conversations)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def test_a_full_queue_refuses_the_next_request_with_429(backbones, tmp_path):
    from fastapi.testclient import TestClient

    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
    from mllm.inference import load_pretrained
    from mllm.serve.app import ServeConfig, Server, build_app

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="full"),
        dtype="fp32",
    )
    model, processor = load_pretrained(make_checkpoint(tmp_path / "ckpt", cfg, seed=1, edit=never_stop))
    gated = GatedProcessor(processor)
    config = ServeConfig(max_batch=1, max_queue=2, batch_wait_ms=0.0)
    server = Server(model, gated, processor, config, "tiny")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}

    with TestClient(build_app(server)) as http, ThreadPoolExecutor(4) as pool:
        post = lambda: http.post("/v1/chat/completions", json=body)  # noqa: E731
        try:
            running = pool.submit(post)
            assert gated.entered.wait(timeout=60), "the worker never took the first request"
            waiting = [pool.submit(post) for _ in range(config.max_queue)]
            deadline = time.monotonic() + 60
            while server.batcher.queued < config.max_queue and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.batcher.queued == config.max_queue and server.batcher.running == 1

            refused = pool.submit(post).result(timeout=30)  # at once: it does not wait for the worker
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and "queue is full (2 waiting" in error["message"]
        finally:
            gated.gate.set()  # the worker goes on: everything that was let in is answered
        answers = [f.result(timeout=120) for f in (running, *waiting)]
        assert [a.status_code for a in answers] == [200] * 3
        assert all(a.json()["choices"][0]["message"]["content"] for a in answers)
