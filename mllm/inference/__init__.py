"""Inference: load a checkpoint with its processor, generate (batched, streamed), chat sessions."""

from __future__ import annotations

import os

from mllm.checkpoint import load_model_and_config
from mllm.export import merge
from mllm.inference.generate import SamplingConfig, StreamPrinter, generate, generate_batch
from mllm.inference.images import ImageError, load_image
from mllm.inference.processor import Conversation, Processor
from mllm.inference.session import ChatSession


def load_pretrained(
    path: str | os.PathLike,
    dtype: str | None = None,
    device: str | None = None,
    load_4bit: bool = False,
    full_precision_base: bool = False,
    merge_adapters: bool = False,
    trust_remote_code: bool = False,
    verify_hashes: bool = True,
):
    """A checkpoint (or a training output directory: its newest complete checkpoint) → `(model, processor)`.

    The processor carries the checkpoint's saved config as `processor.config`. `full_precision_base`: a
    QLoRA checkpoint's adapters go on the unquantised base (for merging and export). `merge_adapters`: fold
    LoRA adapters into an unquantised base in memory before answering — the same function, without peft's
    per-layer detour (faster, the same answers: see docs/measurements.md); ignored for checkpoints without adapters and
    for 4-bit bases, whose merged weights would be rounded.
    `trust_remote_code` (the user's `--trust-remote-code`) lets the backbone folders' own Python code run; the
    checkpoint's saved config never turns it on.
    `verify_hashes=False` skips checking the weight files against their recorded hashes (`--no-verify`); their
    values are checked finite either way.
    """
    model, config = load_model_and_config(
        path,
        dtype=dtype,
        device=device,
        load_4bit=load_4bit,
        full_precision_base=full_precision_base,
        trust_remote_code=trust_remote_code,
        verify_hashes=verify_hashes,
    )
    if merge_adapters and model.config.llm.mode == "lora":
        merge.merge_lora(model)
    return model, Processor.from_checkpoint(model, config)


__all__ = [
    "ChatSession",
    "Conversation",
    "ImageError",
    "Processor",
    "SamplingConfig",
    "StreamPrinter",
    "generate",
    "generate_batch",
    "load_image",
    "load_pretrained",
]
