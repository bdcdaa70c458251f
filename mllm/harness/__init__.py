"""Adapters that let evaluation harnesses people already run score mllm checkpoints (lmms-eval: `lmms_eval.py`).

VLMEvalKit needs no adapter: it talks to `mllm serve` through its OpenAI-compatible API (see docs/inference.md).
"""
