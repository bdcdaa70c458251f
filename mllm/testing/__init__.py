"""Test fixtures: tiny random-weight HF backbone directories and tokenizers, built offline on CPU.

Not part of the training library (nothing under `mllm` but the CLI and `bench` imports it); `mllm backbones make`
writes these directories for tests and quick tries. Real pretrained backbones: `mllm.fetch`.
"""

from mllm.testing.backbones import (
    LLM_FAMILIES,
    VISION_FAMILIES,
    TinySize,
    make_all,
    make_bert,
    make_llm,
    make_vision,
)

__all__ = ["LLM_FAMILIES", "VISION_FAMILIES", "TinySize", "make_all", "make_bert", "make_llm", "make_vision"]
