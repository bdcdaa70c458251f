"""Load a running `mllm serve` with concurrent requests through the official `openai` client; report the figures.

    python -m mllm.serve.loadtest http://127.0.0.1:8000 --requests 64 --image cat.png [--image dog.png ...]

prints requests/s, p50/p95 latency, how many were refused (429/503) and the server's batch sizes (from /health).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class Outcome:
    """One request's fate: its index, the image it carried, status (200, 429, 503, …), answer or refusal text."""

    index: int
    image: str
    status: int
    text: str
    seconds: float


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def run_load(
    base_url: str,
    images: list[str],
    requests: int = 64,
    prompt: str = "What shape is in the image?",
    max_tokens: int = 16,
    api_key: str = "none",
) -> tuple[list[Outcome], float]:
    """Send `requests` chat requests at once (image i % len(images) each); returns the outcomes and wall seconds."""
    import openai  # optional dependency (the serve extra)

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    urls = {p: data_url(p) for p in images}

    def one(i: int) -> Outcome:
        image = images[i % len(images)]
        content = [{"type": "image_url", "image_url": {"url": urls[image]}}, {"type": "text", "text": prompt}]
        start = time.monotonic()
        try:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
            )
            return Outcome(i, image, 200, r.choices[0].message.content, time.monotonic() - start)
        except openai.APIStatusError as e:
            message = e.body.get("message", "") if isinstance(e.body, dict) else str(e.body)
            return Outcome(i, image, e.status_code, message, time.monotonic() - start)

    start = time.monotonic()
    with ThreadPoolExecutor(requests) as pool:
        outcomes = list(pool.map(one, range(requests)))
    return outcomes, time.monotonic() - start


def summary(outcomes: list[Outcome], seconds: float, batch_sizes: dict[str, int]) -> dict:
    """requests/s over the answered ones, p50/p95 latency, refusals, and the batch sizes the server ran."""
    answered = sorted(o.seconds for o in outcomes if o.status == 200)

    def pct(q: float) -> float:
        return (
            round(answered[min(len(answered) - 1, int(q * len(answered)))], 3) if answered else float("nan")
        )

    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "refused": {
            str(s): sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes} - {200})
        },
        "wall_s": round(seconds, 3),
        "requests_per_s": round(len(answered) / seconds, 2),
        "p50_s": pct(0.5),
        "p95_s": pct(0.95),
        "batch_sizes": batch_sizes,
    }


def batch_sizes(base_url: str) -> dict[str, int]:
    """The server's running count of batches per size (GET /health)."""
    with urllib.request.urlopen(f"{base_url}/health", timeout=10) as r:
        return json.load(r)["batch_sizes"]


def batches_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mllm.serve.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("url", help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--image", action="append", required=True, help="image file to send (repeatable; cycled)")
    p.add_argument("--requests", type=int, default=64, help="concurrent requests (default 64)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", default="What shape is in the image?")
    p.add_argument("--api-key", default="none")
    args = p.parse_args(argv)
    before = batch_sizes(args.url)
    outcomes, seconds = run_load(
        args.url, args.image, args.requests, args.prompt, args.max_tokens, args.api_key
    )
    ran = batches_since(before, batch_sizes(args.url))
    print(json.dumps(summary(outcomes, seconds, ran), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
