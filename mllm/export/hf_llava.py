"""Export to the transformers LLaVA layout (`LlavaForConditionalGeneration` + `LlavaProcessor`).

Supported: an `hf` vision tower with at most one prefix (CLS) token and no pooling, an `mlp` connector
with projector `mlp2x_gelu` (LLaVA-1.5's; `LlavaMultiModalProjector` is linear_1 → GELU → linear_2), and
an LLM trained `frozen`, `full`, `lora` or `qlora` (adapters are merged first, QLoRA ones into the
unquantised base). Everything else is refused with
the reason, because transformers' LLaVA could not reproduce what our model computes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from mllm.config import IMAGE_PLACEHOLDER, ModelConfig
from mllm.export.merge import merge_lora, new_output_dir

log = logging.getLogger(__name__)

SUPPORTED = (
    "vision kind 'hf' (a transformers vision model; at most one CLS prefix token, no registers), vision.pool 1; "
    "connector 'mlp' with projector 'mlp2x_gelu' and pixel_shuffle 1; llm mode frozen, full, lora or qlora (adapters merged); "
    "an LLM without final-logit soft-capping; template 'auto' or any template with a Jinja form"
)


class ExportError(ValueError):
    """This checkpoint cannot be represented in the requested format; the message says why."""


def config_problems(cfg: ModelConfig) -> list[str]:
    """What in the saved config transformers' LLaVA cannot express (checked before loading any weights)."""
    reasons = []
    if cfg.vision.kind != "hf":
        reasons.append(
            f"vision tower {cfg.vision.kind!r} is not a transformers model, so LlavaConfig cannot describe it"
        )
    if cfg.vision.pool != 1:
        reasons.append(
            f"vision.pool is {cfg.vision.pool}; LLaVA feeds every patch token to the projector (pool must be 1)"
        )
    v = cfg.vision
    if v.image_aspect != "square" or v.min_pixels or v.max_pixels:
        reasons.append(
            f"vision.image_aspect {v.image_aspect} / min_pixels {v.min_pixels} / max_pixels {v.max_pixels}: "
            "LlavaProcessor feeds each image squashed to the tower's square (image_aspect square, no pixel budget)"
        )
    if cfg.connector.kind != "mlp" or cfg.connector.projector != "mlp2x_gelu":
        what = cfg.connector.kind if cfg.connector.kind != "mlp" else f"mlp/{cfg.connector.projector}"
        reasons.append(
            f"connector {what}: LlavaMultiModalProjector is exactly linear_1 → GELU → linear_2 (mlp2x_gelu)"
        )
    if cfg.connector.pixel_shuffle != 1:
        reasons.append(
            f"connector.pixel_shuffle is {cfg.connector.pixel_shuffle}; LLaVA projects every patch token on its own "
            "(no space-to-depth merge)"
        )
    return reasons


def model_problems(model, template_jinja: str | None) -> list[str]:
    """What in the loaded model or its template transformers' LLaVA cannot express."""
    reasons = []
    if getattr(model.vision, "num_prefix", 0) > 1:
        reasons.append(
            f"the vision tower has {model.vision.num_prefix} prefix tokens; LLaVA can drop exactly one (CLS) or none"
        )
    if getattr(model.llm.config, "final_logit_softcapping", None):
        reasons.append("the LLM soft-caps its logits, which LlavaForConditionalGeneration's head does not")
    if template_jinja is None:
        reasons.append("the checkpoint's chat template has no Jinja form for the processor")
    return reasons


def check_exportable(cfg: ModelConfig, model=None, template_jinja: str | None = None) -> None:
    """Raise `ExportError` listing everything transformers' LLaVA cannot express (model checks when given)."""
    reasons = config_problems(cfg) + (model_problems(model, template_jinja) if model is not None else [])
    if reasons:
        raise ExportError("cannot export to hf-llava: " + "; ".join(reasons) + f". Supported: {SUPPORTED}")


def processor_chat_template(template_jinja: str, system_prompt: str | None = None) -> str:
    """Wrap a string-content template so it also takes transformers' list content ({"type": "image"|"text"}).

    Each image item becomes `<image>\\n`, the way mllm places an image before its text; the checkpoint's
    system prompt is added when the conversation has none, as mllm's own processor does.
    """
    system = ""
    if system_prompt:
        system = (
            "{%- set ns.messages = [{'role': 'system', 'content': " + json.dumps(system_prompt) + "}] -%}"
        )
        system = "{%- if messages and messages[0]['role'] != 'system' -%}" + system + "{%- endif -%}"
    normalise = (
        "{%- set ns = namespace(messages=[]) -%}" + system + "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
        "{%- else -%}{%- set part = namespace(text='') -%}"
        "{%- for c in m['content'] -%}"
        "{%- if c['type'] == 'image' -%}{%- set part.text = part.text + '" + IMAGE_PLACEHOLDER + "\\n' -%}"
        "{%- elif c['type'] == 'text' -%}{%- set part.text = part.text + c['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = part.text -%}{%- endif -%}"
        "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text}] -%}"
        "{%- endfor -%}{%- set messages = ns.messages -%}"
    )
    return normalise + template_jinja


def add_image_token(tokenizer, llm) -> int:
    """Give "<image>" a token id, growing the embeddings by a zero row when the vocabulary is full."""
    tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():
            # Its input row is always replaced by visual features; a zero output row keeps its logit at 0.
            llm.get_input_embeddings().weight[rows:].zero_()
            llm.get_output_embeddings().weight[rows:].zero_()
    return image_id


def llava_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under transformers' LLaVA names; an AnyRes connector's `image_newline` goes to the model's
    own `model.image_newline` (LLaVA-NeXT), not the projector."""
    connector = {k: v for k, v in model.connector.state_dict().items() if k != "image_newline"}
    sd = {f"model.vision_tower.{k}": v for k, v in model.vision.model.state_dict().items()}
    sd.update({f"model.multi_modal_projector.{k}": v for k, v in connector.items()})
    sd.update({f"model.language_model.{k}": v for k, v in model.llm.get_decoder().state_dict().items()})
    if hasattr(model.connector, "image_newline"):
        sd["model.image_newline"] = model.connector.image_newline.detach()
    sd["lm_head.weight"] = model.llm.get_output_embeddings().weight
    return sd


def build_llava(model, tokenizer) -> tuple[LlavaForConditionalGeneration, int]:
    """Our `MultimodalLM` as a `LlavaForConditionalGeneration` with identical weights (LoRA merged)."""
    vision_config = model.vision.model.config
    if type(AutoModel.from_config(vision_config)) is not type(model.vision.model):
        raise ExportError(
            f"transformers builds a different class than {type(model.vision.model).__name__} from its config"
        )
    return build_hf(model, tokenizer, LlavaConfig, LlavaForConditionalGeneration)


def build_hf(model, tokenizer, config_class, model_class, **config_extra):
    """Our `MultimodalLM` as transformers' `model_class` (LLaVA or LLaVA-NeXT) with identical weights: LoRA merged,
    the image token added, the config from ours plus `config_extra`; returns (the model, the image token id)."""
    if model.config.llm.mode == "lora":
        merge_lora(model)
    llm = model.llm
    image_id = add_image_token(tokenizer, llm)
    config = config_class(
        vision_config=model.vision.model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=image_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=model.config.vision.feature_layer,
        vision_feature_select_strategy="default" if model.vision.num_prefix == 1 else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
        **config_extra,
    )
    with torch.device("meta"):
        hf = model_class(config)
    return finish_export(hf, llava_state_dict(model), llm, image_id), image_id


def finish_export(hf, state_dict: dict[str, torch.Tensor], llm, image_id: int):
    """Load `state_dict` into the transformers model `hf` (built on the meta device) and give it the LLM's
    generation settings; every weight must map (a tied LM head may be absent). Returns `hf` in eval mode."""
    missing, unexpected = hf.load_state_dict(state_dict, strict=False, assign=True)
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto {type(hf).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    hf.tie_weights()
    hf.generation_config = llm.generation_config
    hf.generation_config.suppress_tokens = [image_id]  # "<image>" is an input marker, never an answer
    return hf.eval()


def export_hf_llava(
    model, config: dict, tokenizer, template_jinja: str | None, out: str | os.PathLike
) -> Path:
    """Write `out/` so that `LlavaForConditionalGeneration.from_pretrained(out)` and `AutoProcessor.from_pretrained(out)` work."""
    check_exportable(model.config, model, template_jinja)
    out = new_output_dir(out)
    hf, _ = build_llava(model, tokenizer)
    return write_llava_dir(
        hf, LlavaProcessor, model.vision.processor, model, config, tokenizer, template_jinja, out
    )


def write_llava_dir(
    hf, processor_cls, image_processor, model, config: dict, tokenizer, template_jinja: str | None, out: Path
) -> Path:
    """Save a built transformers LLaVA(-NeXT) model `hf` and its `processor_cls` (`image_processor` + `tokenizer`,
    the image token, the chat template) into `out`."""
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.vision.model.config.patch_size,
        vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        chat_template=processor_chat_template(template_jinja, config.get("system_prompt")),
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=model.vision.num_prefix,
    )
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("wrote transformers %s directory %s", type(hf).__name__, out)
    return out
