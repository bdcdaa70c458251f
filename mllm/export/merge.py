"""Merge LoRA adapters into the LLM: a LoRA checkpoint → a standalone `llm.mode = full` checkpoint."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from peft import PeftModel

from mllm.checkpoint import mark_complete, trainable_state_dicts, write_model_files

log = logging.getLogger(__name__)

_RUN_KEYS_DROPPED = ("format_version", "model", "_path")


def new_output_dir(out: str | os.PathLike) -> Path:
    """`out` as a Path, refused (ValueError) when it exists with anything in it: an export never mixes its files
    with what is there."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new output directory")
    return out


def merge_lora(model) -> None:
    """Fold the LoRA deltas into the base weights in place; `model.config.llm.mode` becomes `full`."""
    if model.config.llm.mode == "qlora":
        raise ValueError(
            "merging QLoRA adapters into a 4-bit base would round the merged weights to 4 bits; "
            "load the checkpoint with full_precision_base=True (as `mllm export` does)"
        )
    if not isinstance(model.llm, PeftModel):
        raise ValueError(
            f"the checkpoint's LLM is trained in mode {model.config.llm.mode!r}: it has no LoRA adapters to merge"
        )
    model.llm = model.llm.merge_and_unload()
    model.config = copy.deepcopy(model.config)
    model.config.llm.mode = "full"


def write_merged_checkpoint(model, config: dict, out: str | os.PathLike) -> Path:
    """Write `model` (already merged) as a complete checkpoint carrying the source's template and run settings."""
    out = new_output_dir(out)
    meta = {k: v for k, v in config.items() if k not in _RUN_KEYS_DROPPED}
    meta["merged_from"] = config.get("_path")
    tokenizer = getattr(model.connector, "tokenizer", None)
    write_model_files(
        out, model.config, trainable_state_dicts(model), meta=meta, connector_tokenizer=tokenizer
    )
    mark_complete(out)
    log.info("wrote merged checkpoint %s (llm mode full)", out)
    return out
