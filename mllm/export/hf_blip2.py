"""transformers BLIP-2 / InstructBLIP checkpoints in and out.

In (`import_hf_blip2`): a `Blip2ForConditionalGeneration` or `InstructBlipForConditionalGeneration` directory
becomes an mllm checkpoint — its vision model the frozen tower (kind `blip2`, read from the source directory),
Q-Former + query tokens + language projection the `qformer` connector (InstructBLIP's text-aware and
instruction-aware, with its Q-Former tokenizer), its language model the LLM (saved as its own HF directory beside
the checkpoint). `mllm train --stage 2 --init-from OUT` then fine-tunes it (LoRA or full).

Out (`export_hf_blip2`): the reverse. Supported: vision kind `blip2`, connector `qformer` (for `hf-blip2` not
instruction-aware: a text-aware Q-Former drops its text half, which the query path never uses; for
`hf-instructblip` text-aware and instruction-aware), a decoder-only LLM trained frozen, full, lora or qlora
(adapters merged). The exported processor is transformers' own (image tokens first, then the text; InstructBLIP's
Q-Former reads the whole prompt), while mllm places the image where its chat template puts `<image>` and gives the
Q-Former the last user turn: the model computes the same, the prompt layout is the processor's.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from mllm.checkpoint import mark_complete, write_model_files
from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig
from mllm.export.hf_llava import ExportError, add_image_token, finish_export
from mllm.export.merge import merge_lora, new_output_dir

log = logging.getLogger(__name__)

_TEXT_FFN = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")
"""The text feed-forward of a text-aware Q-Former layer (not `attention.output`, not the `_query` one)."""

LLM_DIR = "llm"
"""Where an imported checkpoint keeps its language model (a plain HF causal-LM directory)."""


@dataclass(frozen=True)
class Blip2Family:
    model_type: str
    """`model_type` in the transformers config.json."""
    model_class: str
    config_class: str
    qformer_config_class: str
    processor_class: str
    instruction_aware: bool
    """InstructBLIP: the Q-Former reads the instruction beside the queries."""


FAMILIES = {
    "hf-blip2": Blip2Family(
        "blip-2",
        "Blip2ForConditionalGeneration",
        "Blip2Config",
        "Blip2QFormerConfig",
        "Blip2Processor",
        False,
    ),
    "hf-instructblip": Blip2Family(
        "instructblip",
        "InstructBlipForConditionalGeneration",
        "InstructBlipConfig",
        "InstructBlipQFormerConfig",
        "InstructBlipProcessor",
        True,
    ),
}
_BY_MODEL_TYPE = {f.model_type: name for name, f in FAMILIES.items()}

SUPPORTED = (
    "vision kind 'blip2' (a BLIP-2 / InstructBLIP vision model); connector 'qformer' (hf-blip2: not "
    "instruction-aware; hf-instructblip: text-aware and instruction-aware); a decoder-only LLM in mode frozen, "
    "full, lora or qlora (adapters merged)"
)


# ---- in ---------------------------------------------------------------------------------------------
def import_hf_blip2(src: str | os.PathLike, out: str | os.PathLike, template: str = "auto") -> Path:
    """Write an mllm checkpoint at `out` from the transformers BLIP-2 / InstructBLIP directory `src`."""
    src, out = Path(src).resolve(), new_output_dir(out)
    model_type = AutoConfig.from_pretrained(src).model_type
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"{src}: a '{model_type}' checkpoint; mllm imports {sorted(_BY_MODEL_TYPE)} "
            "(Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration)"
        )
    family = FAMILIES[_BY_MODEL_TYPE[model_type]]
    hf = getattr(transformers, family.model_class).from_pretrained(src, dtype=torch.float32)
    if not hf.config.use_decoder_only_language_model:
        raise ValueError(
            f"{src}: its language model is a {hf.config.text_config.model_type} (encoder-decoder); "
            "mllm trains decoder-only LLMs"
        )
    qcfg = hf.config.qformer_config
    if getattr(qcfg, "use_qformer_text_input", False):
        raise ValueError(
            f"{src}: a BLIP-2 Q-Former with text input (use_qformer_text_input) is not supported"
        )
    fixed = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512}
    wrong = {k: getattr(qcfg, k) for k, v in fixed.items() if getattr(qcfg, k) != v}
    if wrong:
        raise ValueError(
            f"{src}: Q-Former settings {wrong} differ from the ones mllm's Q-Former builds with {fixed}"
        )
    qformer_tokenizer = (
        AutoTokenizer.from_pretrained(src, subfolder="qformer_tokenizer")
        if family.instruction_aware
        else None
    )
    connector = ConnectorConfig(
        kind="qformer",
        num_queries=hf.config.num_query_tokens,
        num_layers=qcfg.num_hidden_layers,
        hidden_size=qcfg.hidden_size,
        num_heads=qcfg.num_attention_heads,
        intermediate_size=qcfg.intermediate_size,
        cross_attention_frequency=qcfg.cross_attention_frequency,
        qformer_text=family.instruction_aware,
        vocab_size=qcfg.vocab_size if family.instruction_aware else 0,
        instruction_aware=family.instruction_aware,
    )
    out.mkdir(parents=True, exist_ok=True)
    hf.language_model.save_pretrained(out / LLM_DIR)
    AutoTokenizer.from_pretrained(src).save_pretrained(out / LLM_DIR)
    cfg = ModelConfig(
        vision=VisionConfig(path=str(src), kind="blip2", pool=1),
        connector=connector,
        llm=LLMConfig(path=str((out / LLM_DIR).resolve()), mode="frozen"),
    )
    weights = {"query_tokens": hf.query_tokens.data}
    weights.update({f"qformer.{k}": v for k, v in hf.qformer.state_dict().items()})
    weights.update({f"proj.{k}": v for k, v in hf.language_projection.state_dict().items()})
    weights = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    meta = {"template": template, "imported_from": str(src)}
    write_model_files(out, cfg, {"connector": weights}, meta=meta, connector_tokenizer=qformer_tokenizer)
    mark_complete(out)
    log.info("imported %s (%s) as mllm checkpoint %s", src, model_type, out)
    return out


# ---- out --------------------------------------------------------------------------------------------
def config_problems(cfg: ModelConfig, fmt: str) -> list[str]:
    """What in the saved config transformers' BLIP-2 (`hf-blip2`) or InstructBLIP (`hf-instructblip`) cannot express."""
    family = FAMILIES[fmt]
    reasons = []
    if cfg.vision.kind != "blip2":
        reasons.append(
            f"vision tower {cfg.vision.kind!r}: {family.config_class} describes BLIP-2's own ViT only "
            "(vision kind 'blip2', from a BLIP-2 / InstructBLIP checkpoint)"
        )
    c = cfg.connector
    if c.kind != "qformer":
        reasons.append(f"connector {c.kind}: BLIP-2's bridge is a Q-Former with a linear language projection")
    elif family.instruction_aware and not c.instruction_aware:
        reasons.append("the Q-Former is not instruction-aware, which InstructBLIP's always is")
    elif not family.instruction_aware and c.instruction_aware:
        reasons.append("the Q-Former is instruction-aware, which BLIP-2's never is (export hf-instructblip)")
    return reasons


def check_exportable(cfg: ModelConfig, fmt: str) -> None:
    reasons = config_problems(cfg, fmt)
    if reasons:
        raise ExportError(f"cannot export to {fmt}: " + "; ".join(reasons) + f". Supported: {SUPPORTED}")


def _qformer_state_dict(connector, instruction_aware: bool) -> dict[str, torch.Tensor]:
    """Our Q-Former's weights under transformers' names; BLIP-2's Q-Former has no text half (dropped if we have one)."""
    sd = connector.qformer.state_dict()
    if instruction_aware or not connector.text_aware:
        return sd
    out = {}
    for key, value in sd.items():
        if key.startswith("embeddings.layernorm."):
            out[key.replace("embeddings.layernorm.", "layernorm.")] = value
        elif not key.startswith("embeddings.") and not _TEXT_FFN.match(key):
            out[key] = value
    return out


def build_blip2(model, tokenizer, fmt: str):
    """Our `MultimodalLM` as a transformers BLIP-2 / InstructBLIP model with identical weights (LoRA merged)."""
    family = FAMILIES[fmt]
    if model.config.llm.mode == "lora":
        merge_lora(model)
    llm, connector = model.llm, model.connector
    image_id = add_image_token(tokenizer, llm)
    qformer_config = getattr(transformers, family.qformer_config_class)(**connector.qformer.config.to_dict())
    config = getattr(transformers, family.config_class)(
        vision_config=model.vision.model.config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=llm.config.to_dict(),
        num_query_tokens=model.num_image_tokens,
        image_token_index=image_id,
    )
    if not config.use_decoder_only_language_model:
        raise ExportError(
            f"cannot export to {fmt}: the LLM {llm.config.model_type} is not a causal LM transformers knows"
        )
    with torch.device("meta"):
        hf = getattr(transformers, family.model_class)(config)
    sd = {f"vision_model.{k}": v for k, v in model.vision.model.state_dict().items()}
    sd["query_tokens"] = connector.query_tokens
    sd.update(
        {f"qformer.{k}": v for k, v in _qformer_state_dict(connector, family.instruction_aware).items()}
    )
    sd.update({f"language_projection.{k}": v for k, v in connector.proj.state_dict().items()})
    sd.update({f"language_model.{k}": v for k, v in llm.state_dict().items()})
    return finish_export(hf, sd, llm, image_id), image_id


def export_hf_blip2(model, config: dict, tokenizer, out: str | os.PathLike, fmt: str = "hf-blip2") -> Path:
    """Write `out/` so that transformers' BLIP-2 / InstructBLIP class and `AutoProcessor` load it."""
    check_exportable(model.config, fmt)
    out = new_output_dir(out)
    family = FAMILIES[fmt]
    hf, _ = build_blip2(model, tokenizer, fmt)
    parts = dict(image_processor=model.vision.processor, tokenizer=tokenizer)
    if family.instruction_aware:
        parts["qformer_tokenizer"] = model.connector.tokenizer
    processor = getattr(transformers, family.processor_class)(
        **parts, num_query_tokens=model.num_image_tokens
    )
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("wrote transformers %s directory %s", family.model_class, out)
    return out
