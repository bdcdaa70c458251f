"""`mllm backbones make`: real HF directories that load with plain from_pretrained; runtime choices."""

from __future__ import annotations

import os

import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from mllm.cli import main
from mllm.config import ModelConfig
from mllm.model.runtime import resolve_runtime


def test_cli_writes_loadable_directories(tmp_path, capsys):
    assert (
        main(
            [
                "backbones",
                "make",
                str(tmp_path),
                "--llm",
                "qwen2",
                "gpt2",
                "--vision",
                "siglip",
                "--llm-hidden",
                "32",
            ]
        )
        == 0
    )
    assert sorted(os.listdir(tmp_path)) == ["llm-gpt2", "llm-qwen2", "vision-siglip"]
    for fam in ("qwen2", "gpt2"):
        d = tmp_path / f"llm-{fam}"
        assert (d / "model.safetensors").is_file()
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok)
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert "hi" in text
        ids = tok(text, return_tensors="pt").input_ids
        assert model(ids).logits.shape[-1] == len(tok)
    vision = AutoModel.from_pretrained(tmp_path / "vision-siglip")
    proc = AutoImageProcessor.from_pretrained(tmp_path / "vision-siglip")
    assert type(vision).__name__ == "SiglipVisionModel" and proc is not None


def test_runtime_resolution_is_explicit_and_overridable():
    rt = resolve_runtime("fp32", "auto", "cpu")
    assert rt.dtype == torch.float32 and rt.attn_implementation == "sdpa"  # no CUDA → never flash-attn
    assert resolve_runtime("bf16", "eager", "cpu").attn_implementation == "eager"
    assert "dtype=bfloat16" in resolve_runtime("bf16", "auto", "cpu").describe()


def test_training_attention_is_eager_only_for_short_rows_on_a_cpu():
    from mllm.model.runtime import EAGER_MAX_TOKENS, EAGER_MAX_TOKENS_COMPILED, Runtime, training_attention

    cpu = resolve_runtime("bf16", "auto", "cpu")
    assert training_attention("auto", cpu, 40) == training_attention("auto", cpu, EAGER_MAX_TOKENS) == "eager"
    assert training_attention("auto", cpu, EAGER_MAX_TOKENS + 1) == "sdpa"  # long rows: eager's scores lose
    assert (
        training_attention("auto", cpu, EAGER_MAX_TOKENS_COMPILED, compiled=True) == "eager"
    )  # fused by inductor
    assert training_attention("auto", cpu, EAGER_MAX_TOKENS_COMPILED + 1, compiled=True) == "sdpa"
    pinned = resolve_runtime("bf16", "sdpa", "cpu")
    assert training_attention("sdpa", pinned, 40) == "sdpa"  # asked for by name: kept
    gpu = Runtime(torch.bfloat16, "flash_attention_2", torch.device("cuda"))
    assert training_attention("auto", gpu, 40) == "flash_attention_2"


def test_model_config_round_trips_and_rejects_unknown_keys():
    cfg = ModelConfig.from_dict({"vision": {"path": "v", "pool": 2}, "llm": {"path": "l", "mode": "lora"}})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    import pytest

    with pytest.raises(ValueError, match="unknown VisionConfig keys: \\['layer'\\]"):
        ModelConfig.from_dict({"vision": {"layer": -1}})
