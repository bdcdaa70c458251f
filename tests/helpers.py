"""Test helpers shared across test modules: complete tiny checkpoints and deterministic images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mllm.checkpoint import mark_complete, trainable_state_dicts, write_model_files
from mllm.model import build_model


def make_checkpoint(
    directory, cfg, seed: int = 0, template: str = "auto", system_prompt=None, scale: float = 4.0, edit=None
) -> str:
    """Build a tiny model, sharpen its trainable weights so greedy outputs depend on the input, save it complete.

    `edit(model)`, when given, changes the model further before it is saved.
    """
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02).mul_(scale)
        if edit is not None:
            edit(model)
    adapter = model.llm.peft_config["default"] if cfg.llm.mode in ("lora", "qlora") else None
    meta = {"template": template, "system_prompt": system_prompt, "max_length": 512}
    write_model_files(
        directory,
        model.config,
        trainable_state_dicts(model),
        meta=meta,
        adapter_config=adapter,
        connector_tokenizer=getattr(model.connector, "tokenizer", None),
    )
    mark_complete(directory)
    return str(directory)


def make_image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
