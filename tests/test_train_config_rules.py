"""The run config's validation rules: each one refuses a config that breaks it, with its own message."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from mllm.train.config import TrainConfig

BROKEN = [
    (dict(stage=3), "stage must be 0, 1 or 2, got 3"),
    (dict(llm_mode="half"), "llm_mode must be frozen|full|lora|qlora, got 'half'"),
    (dict(schedule="step"), "schedule must be cosine|linear|constant, got 'step'"),
    (dict(dtype="fp16"), "dtype must be auto|bf16|fp32 (fp16 needs loss scaling), got 'fp16'"),
    (dict(attention="flash"), "attention must be auto|eager|sdpa|flash_attention_2, got 'flash'"),
    *[
        (
            change,
            f"connector_width ({change.get('connector_width', 0)}, 0 = the vision width) must be >= 0 and divisible "
            f"by connector_heads ({change.get('connector_heads', 8)}); connector_layers must be >= 1",
        )
        for change in (
            dict(connector_width=100, connector_heads=8),
            dict(connector_width=-8),
            dict(connector_layers=0),
            dict(connector_heads=0),
        )
    ],
    (dict(micro_batch_size=0), "micro_batch_size must be >= 1"),
    (dict(pad_to_multiple_of=0), "pad_to_multiple_of must be >= 1 (1 = no rounding)"),
    (dict(packing="yes"), "packing and compile must be auto|on|off, got 'yes' and 'auto'"),
    (dict(compile="yes"), "packing and compile must be auto|on|off, got 'auto' and 'yes'"),
    *[
        (
            change,
            "pack_row_tokens and loss_chunk_size must be >= 0 (0 = automatic / off), prefetch_factor >= 1",
        )
        for change in (dict(pack_row_tokens=-1), dict(loss_chunk_size=-1), dict(prefetch_factor=0))
    ],
    (
        dict(feature_cache="cache", train_vision=True),
        "--feature-cache serves a frozen tower's features; with --train-vision the tower changes every step, so "
        "its features cannot be cached: drop one of the two",
    ),
    (dict(max_tokens=-1), "max_tokens must be >= 0 (0 = no token budget)"),
    *[
        (
            dict(feature_cache="cache", **change),
            "--feature-cache stores one tower output per image file; with --image-aspect pad/anyres or a pixel "
            "budget the tower sees other pixels: drop --feature-cache",
        )
        for change in (dict(image_aspect="anyres"), dict(image_aspect="pad"), dict(max_pixels=10_000))
    ],
    *[
        (change, "grad_accum must be >= 0 and global_batch_size >= 1")
        for change in (dict(grad_accum=-1), dict(global_batch_size=0))
    ],
    *[(change, "max_steps must be >= 0 and epochs > 0") for change in (dict(max_steps=-1), dict(epochs=0.0))],
    *[
        (change, "lr must be > 0 and connector_lr >= 0")
        for change in (dict(lr=0.0), dict(connector_lr=-1e-4))
    ],
    (dict(warmup_ratio=1.0), "warmup_ratio must be in [0, 1), got 1.0"),
    (dict(warmup_ratio=-0.1), "warmup_ratio must be in [0, 1), got -0.1"),
    *[
        (change, "grad_clip and weight_decay must be >= 0")
        for change in (dict(grad_clip=-1.0), dict(weight_decay=-0.1))
    ],
    *[
        (change, "save_every and keep_last must be >= 0")
        for change in (dict(save_every=-1), dict(keep_last=-1))
    ],
    *[
        (change, "log_every must be >= 1 and num_workers >= 0")
        for change in (dict(log_every=0), dict(num_workers=-1))
    ],
    (dict(max_skipped_steps=0), "max_skipped_steps must be >= 1"),
    *[
        (
            change,
            f"--mir-every {change['mir_every']} needs --mir-data (the samples MIR is measured on), and must be >= 0",
        )
        for change in (dict(mir_every=5), dict(mir_every=-1, mir_data="captions.json"))
    ],
    (
        dict(stage=0, mir_data="captions.json"),
        "--mir-data measures visual tokens inside the LLM; stage 0 loads none: drop --mir-data",
    ),
    *[
        (change, "lora_r must be >= 1 and lora_dropout in [0, 1)")
        for change in (dict(lora_r=0), dict(lora_dropout=1.0))
    ],
    (dict(stage=1, llm_mode="lora"), "stage 1 trains only the connector: llm_mode must be frozen"),
    (
        dict(stage=0, connector="qformer", qformer_text=True, packing="off", init_from="stage1-out"),
        "init_from is for stages 1 (from a stage-0 Q-Former) and 2 (from a stage-1 connector); stage 0 starts "
        "from a BERT: --qformer-init",
    ),
    *[
        (
            dict(stage=0, packing="off", **change),
            "stage 0 pretrains the text-aware Q-Former: --connector qformer --qformer-text (and --qformer-init)",
        )
        for change in (dict(connector="mlp"), dict(connector="qformer", qformer_text=False))
    ],
    *[
        (
            dict(stage=0, connector="qformer", qformer_text=True, **change),
            "stage 0 reads one caption per row and has no LLM: --packing off, no --compile on, no "
            "--instruction-aware",
        )
        for change in (
            dict(packing="auto"),
            dict(packing="off", compile="on"),
            dict(packing="off", instruction_aware=True),
        )
    ],
]
"""Each rule's violations (every clause of it on its own) and the exact message the refusal gives."""


@pytest.mark.parametrize("change, message", BROKEN, ids=[" ".join(map(str, c.items())) for c, _ in BROKEN])
def test_each_violation_is_refused_with_its_message(change, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig(**change)


def test_every_rule_is_exercised_and_a_valid_config_passes():
    """Each rule in the table is the first one broken by some row of BROKEN (a new rule needs its row here)."""
    from mllm.train.config import RULES

    defaults = TrainConfig().to_dict()
    first_broken = set()
    for change, message in BROKEN:
        values = SimpleNamespace(**{**defaults, **change})
        rule = next(r for r in RULES if not r.holds(values))
        assert rule.message.format_map(vars(values)) == message
        first_broken.add(rule)
    assert first_broken == set(RULES), [r.message for r in set(RULES) - first_broken]
    for stage in (1, 2):
        TrainConfig(
            stage=stage, llm_mode="frozen" if stage == 1 else "lora", init_from="" if stage == 1 else "x"
        )
    TrainConfig(stage=1, init_from="stage0-out")  # stage 1 may start from a stage-0 Q-Former
    TrainConfig(stage=0, connector="qformer", qformer_text=True, packing="off")
