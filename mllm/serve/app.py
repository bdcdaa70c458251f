"""The HTTP app: OpenAI chat completions (plain and server-sent events), `/v1/models`, `/health`, the chat page at `/`.

FastAPI (on starlette) gives routing, SSE-friendly streaming responses and pydantic request checking; uvicorn
serves it. Generation happens on the `Batcher`'s worker thread; the event loop only parses, checks and relays.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mllm.serve.batcher import Batcher, Closed, Job, QueueFull
from mllm.serve.protocol import (
    ChatRequest,
    Limits,
    RequestError,
    option,
    parse_request,
    sampling_of,
    to_conversation,
)

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How `mllm serve` runs; each field is a command-line option of the same name."""

    host: str = option(
        "127.0.0.1",
        "address to bind: this machine only unless you say otherwise (0.0.0.0 opens it to the network)",
    )
    port: int = option(8000, "TCP port")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* requests")
    image_dir: str | None = option(
        None, "directory image_url paths may name (relative, inside it); without it only data: URLs are taken"
    )
    model_name: str | None = option(
        None, "model id clients send and /v1/models lists; None: the checkpoint's directory name"
    )
    max_batch: int = option(8, "most requests answered together in one batch")
    max_queue: int = option(64, "most requests waiting; more are refused with 429")
    batch_wait_ms: float = option(
        10.0, "when idle, how long the first request waits for companions to batch with"
    )
    limits: Limits = field(default_factory=Limits)


class Server:
    """Holds the model, its processor, a second processor for checking prompts on the event loop, and the batcher."""

    def __init__(self, model, processor, check_processor, config: ServeConfig, model_name: str):
        self.processor, self.check_processor = processor, check_processor
        self.config, self.model_name = config, model_name
        self.batcher = Batcher(
            model, processor, config.max_batch, config.max_queue, config.batch_wait_ms / 1000
        )
        self.created = int(time.time())
        self.context = processor.max_length or getattr(model.llm.config, "max_position_embeddings", None)

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (whatever Content-Length claims)."""
        limit = self.config.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def job_for(self, req: ChatRequest) -> Job:
        """A checked request as a queued `Job`; 400/404/413/429/503 on the way when it cannot be answered."""
        if req.model != self.model_name:
            raise RequestError(
                404, f"model {req.model!r} is not served here; GET /v1/models lists {self.model_name!r}"
            )
        sampling, stop = sampling_of(req, self.config.limits)
        conversation = await run_in_threadpool(
            to_conversation, req, self.config.image_dir, self.config.limits
        )
        n = len(self.check_processor.prompt_ids(conversation.messages))
        if self.context and n > self.context:
            raise RequestError(
                400,
                f"the prompt is {n} tokens, longer than the model's context of {self.context}; shorten it",
            )
        job = Job(conversation, sampling, stop, req.seed, asyncio.get_running_loop(), prompt_tokens=n)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise RequestError(429, str(e)) from None
        except Closed as e:
            raise RequestError(503, str(e)) from None
        return job

    def chunk(self, rid: str, delta: dict, finish: str | None = None) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, job: Job, rid: str):
        yield self.chunk(rid, {"role": "assistant", "content": ""})
        while True:
            kind, *rest = await job.events.get()
            if kind == "delta":
                yield self.chunk(rid, {"content": rest[0]})
            elif kind == "done":
                yield self.chunk(rid, {}, rest[1])
                break
            else:
                status, message = rest
                yield f"data: {json.dumps(_error_body(status, message))}\n\n"
                break
        yield "data: [DONE]\n\n"

    async def complete(self, job: Job, rid: str) -> dict:
        while True:
            kind, *rest = await job.events.get()
            if kind == "done":
                answer, finish, tokens = rest
                break
            if kind == "error":
                raise RequestError(*rest)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": job.prompt_tokens + tokens,
            },
        }

    def health(self) -> dict:
        b = self.batcher
        return {
            "status": "ok",
            "model": self.model_name,
            "queued": b.queued,
            "running": b.running,
            "max_queue": b.max_queue,
            "batch_sizes": {str(k): v for k, v in sorted(b.batch_sizes.items())},
        }


def _error_body(status: int, message: str) -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    kinds |= {413: "request_too_large", 429: "rate_limit_error", 503: "service_unavailable"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "code": status}}


def build_app(server: Server) -> FastAPI:
    """The routes, over one `Server`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.batcher.close()  # waiting requests get 503; the running batch finishes

    app = FastAPI(title="mllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    page = resources.files("mllm.serve").joinpath("static/index.html").read_text()

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        log.info("%s %s → %d: %s", request.method, request.url.path, e.status, e.message)
        return JSONResponse(_error_body(e.status, e.message), status_code=e.status)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page.replace("{{MODEL}}", html.escape(server.model_name))

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_key(request)
        entry = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "mllm"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        server.check_key(request)
        req = parse_request(await server.read_body(request))
        job = await server.job_for(req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(server.stream(job, rid), media_type="text/event-stream")
        return JSONResponse(await server.complete(job, rid))

    return app
