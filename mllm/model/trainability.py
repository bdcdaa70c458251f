"""Trainability per component, applied in one place: vision frozen|full, connector full, llm frozen|full|lora|qlora."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from mllm.config import LLMConfig


def apply_trainability(model: nn.Module) -> nn.Module:
    """Freeze/unfreeze each component of a `MultimodalLM` as its config declares; wraps the LLM for (Q)LoRA."""
    cfg = model.config
    model.vision.requires_grad_(cfg.vision.trainable == "full")
    model.connector.requires_grad_(True)
    mode = cfg.llm.mode
    if mode in ("lora", "qlora"):
        model.llm = _wrap_lora(model.llm, cfg.llm)
    else:
        model.llm.requires_grad_(mode == "full")
    return model


def _wrap_lora(llm: nn.Module, cfg: LLMConfig) -> nn.Module:
    if isinstance(llm, PeftModel):
        return llm
    if cfg.mode == "qlora":
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, lora)


def parameter_table(model: nn.Module) -> list[tuple[str, int, int]]:
    """(component, trainable, total) for vision, connector, llm (or a stage-0 model's heads); counts 4-bit packed
    weights by elements."""
    rows = []
    for name in ("vision", "connector", "llm", "heads"):
        if not hasattr(model, name):
            continue
        trainable = total = 0
        for p in getattr(model, name).parameters():
            n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            if getattr(p, "quant_state", None) is not None:
                n *= 2  # bitsandbytes packs two 4-bit values per byte
            total += n
            trainable += n if p.requires_grad else 0
        rows.append((name, trainable, total))
    return rows


def format_parameter_table(rows: list[tuple[str, int, int]]) -> str:
    lines = [f"{'component':<10} {'trainable':>14} {'total':>14}  share"]
    for name, t, n in rows + [("all", sum(r[1] for r in rows), sum(r[2] for r in rows))]:
        lines.append(f"{name:<10} {t:>14,} {n:>14,}  {100 * t / max(n, 1):5.1f}%")
    return "\n".join(lines)
