"""`mllm serve`: an OpenAI-compatible chat-completions server with dynamic batching, and its web chat page.

protocol.py  the request: checked, images opened safely, turned into a `Conversation`
batcher.py   requests that arrive together answered by one `generate_batch` call; bounded queue
app.py       the HTTP routes (FastAPI) over one `Server`
loadtest.py  concurrent requests through the `openai` client: requests/s, latency, batch sizes
static/      the chat page served at `/` (plain HTML + JS)
"""
