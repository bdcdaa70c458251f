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


def never_stop(model) -> None:
    """Answers run to --max-new-tokens: the (tied) end-of-turn row becomes half of another token's row.

    Its logit is then half that token's, below the largest logit whenever that is positive, so greedy
    decoding never picks it and every answer is long enough to watch it stream.
    """
    from mllm.model import load_tokenizer

    eos = load_tokenizer(model.config).eos_token_id
    table = model.llm.get_output_embeddings().weight
    table[eos] = 0.5 * table[(eos + 1) % table.shape[0]]
