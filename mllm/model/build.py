"""Assemble a `MultimodalLM` from a `ModelConfig`: load both backbones with `from_pretrained`, build the connector."""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from mllm.config import ModelConfig
from mllm.connectors import build_connector
from mllm.model.multimodal import MultimodalLM
from mllm.model.runtime import Runtime, resolve_runtime
from mllm.model.trainability import apply_trainability
from mllm.vision import build_vision_tower

log = logging.getLogger(__name__)


def load_llm(cfg: ModelConfig, runtime: Runtime, load_4bit: bool = False):
    """The causal LM via `from_pretrained`; NF4 4-bit (bitsandbytes) for QLoRA or when `load_4bit` asks."""
    kwargs = dict(
        dtype=runtime.dtype,
        attn_implementation=runtime.attn_implementation,
        trust_remote_code=cfg.llm.trust_remote_code,
    )
    if cfg.llm.mode == "qlora" or load_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=runtime.dtype,
        )
        kwargs["device_map"] = {"": runtime.device.index if runtime.device.type == "cuda" else "cpu"}
    return AutoModelForCausalLM.from_pretrained(cfg.llm.path, **kwargs)


def load_tokenizer(cfg: ModelConfig):
    return AutoTokenizer.from_pretrained(cfg.llm.path, trust_remote_code=cfg.llm.trust_remote_code)


def build_model(
    cfg: ModelConfig, runtime: Runtime | None = None, trainable: bool = True, load_4bit: bool = False
) -> MultimodalLM:
    """Load the backbones, build the connector (fp32), and apply the declared trainability.

    `load_4bit` quantises a frozen LLM to NF4 for inference (QLoRA mode always does).
    """
    runtime = runtime or resolve_runtime(cfg.dtype, cfg.attn_implementation)
    log.info("runtime: %s", runtime.describe())
    vision = build_vision_tower(cfg.vision, dtype=runtime.dtype, trust_remote_code=cfg.llm.trust_remote_code)
    llm = load_llm(cfg, runtime, load_4bit)
    llm.config.use_cache = False
    connector = build_connector(
        cfg.connector,
        vision.hidden_size,
        vision.num_tokens,
        llm.config.hidden_size,
        image_newline=cfg.vision.image_aspect == "anyres",
    )
    connector.to(torch.float32)
    # A connector that resolves sizes from elsewhere (a Q-Former's BERT init) states them: the checkpoint saves those.
    cfg = dataclasses.replace(cfg, connector=getattr(connector, "config", cfg.connector))
    model = MultimodalLM(cfg, vision, connector, llm)
    if trainable:
        apply_trainability(model)
    else:
        model.requires_grad_(False)
    return model
