"""Offline backbones: tiny random HF directories, and the real SmolLM2 fetched from its PyPI package."""

from mllm.backbones.make import (
    LLM_FAMILIES,
    VISION_FAMILIES,
    TinySize,
    make_all,
    make_bert,
    make_llm,
    make_vision,
)

__all__ = ["LLM_FAMILIES", "VISION_FAMILIES", "TinySize", "make_all", "make_bert", "make_llm", "make_vision"]
