"""Export an AnyRes model to transformers' LLaVA-NeXT layout (`LlavaNextForConditionalGeneration` + its processor).

Supported: everything `hf-llava` supports (an `hf` vision tower with at most one CLS prefix token, no pooling,
the `mlp2x_gelu` projector without pixel shuffle, an LLM frozen / full / lora / qlora), trained with
`vision.image_aspect anyres` and no pixel budget (`min_pixels` / `max_pixels` 0: transformers' processor tiles
each image at its own size). The grid pinpoints, the learned `image_newline` and the tower's preprocessing go
into the config and `LlavaNextImageProcessor`; tiles, unpadding and newlines then match `mllm.data.layout`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from mllm.config import ModelConfig
from mllm.export import hf_llava
from mllm.export.hf_llava import ExportError, build_hf, write_llava_dir
from mllm.export.merge import new_output_dir

log = logging.getLogger(__name__)

SUPPORTED = (
    "vision.image_aspect anyres without min_pixels / max_pixels, and otherwise what hf-llava supports: "
    + hf_llava.SUPPORTED
)


def config_problems(cfg: ModelConfig) -> list[str]:
    """What in the saved config transformers' LLaVA-NeXT cannot express (checked before loading any weights)."""
    reasons = []
    if cfg.vision.image_aspect != "anyres":
        reasons.append(
            f"vision.image_aspect is {cfg.vision.image_aspect!r}; LLaVA-NeXT always tiles (anyres); "
            "export this model with --format hf-llava"
        )
    if cfg.vision.min_pixels or cfg.vision.max_pixels:
        reasons.append(
            "vision.min_pixels / max_pixels rescale images before tiling, which LlavaNextImageProcessor does not"
        )
    # the tower, projector and LLM rules are LLaVA's own; the aspect and pixel budgets are judged above
    vision = dataclasses.replace(cfg.vision, image_aspect="square", min_pixels=0, max_pixels=0)
    square = dataclasses.replace(cfg, vision=vision)
    return reasons + hf_llava.config_problems(square)


def check_exportable(cfg: ModelConfig, model=None, template_jinja: str | None = None) -> None:
    """Raise `ExportError` listing everything LLaVA-NeXT cannot express (model checks when `model` is given)."""
    reasons = config_problems(cfg) + (
        hf_llava.model_problems(model, template_jinja) if model is not None else []
    )
    if reasons:
        raise ExportError(
            "cannot export to hf-llava-next: " + "; ".join(reasons) + f". Supported: {SUPPORTED}"
        )


def build_llava_next(model, tokenizer) -> tuple[LlavaNextForConditionalGeneration, int]:
    """Our AnyRes `MultimodalLM` as a `LlavaNextForConditionalGeneration` with identical weights (LoRA merged)."""
    pinpoints = [list(p) for p in model.image_layout.grid_pinpoints]
    return build_hf(
        model, tokenizer, LlavaNextConfig, LlavaNextForConditionalGeneration, image_grid_pinpoints=pinpoints
    )


def image_processor(model) -> LlavaNextImageProcessorPil:
    """The tower's own preprocessing (size, crop, mean, std, resampling) with the model's grid pinpoints."""
    tower = model.vision.processor
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in model.image_layout.grid_pinpoints],
        size=dict(tower.size),
        crop_size=dict(tower.crop_size) if getattr(tower, "crop_size", None) else None,
        do_center_crop=bool(getattr(tower, "do_center_crop", False)),
        image_mean=list(tower.image_mean),
        image_std=list(tower.image_std),
        resample=tower.resample,
        rescale_factor=tower.rescale_factor,
    )


def export_hf_llava_next(
    model, config: dict, tokenizer, template_jinja: str | None, out: str | os.PathLike
) -> Path:
    """Write `out/` so that `LlavaNextForConditionalGeneration.from_pretrained(out)` and
    `AutoProcessor.from_pretrained(out)` work."""
    check_exportable(model.config, model, template_jinja)
    out = new_output_dir(out)
    hf, _ = build_llava_next(model, tokenizer)
    return write_llava_dir(
        hf, LlavaNextProcessor, image_processor(model), model, config, tokenizer, template_jinja, out
    )
